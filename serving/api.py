"""The HTTP API of the ingress (FastAPI, built on each ingress replica by `Ingress.__serve_build_asgi_app__`).

Auth: /v1/* needs `Authorization: Bearer TOKEN` when [serve] auth is on (401 without, 403 for a wrong one), then
passes the token's per-minute limit (429 + Retry-After); the probes, the docs and the web UI are open (the UI asks
for the token). Every error is JSON `ErrorBody` {"error", "field", "request_id"}. Every answer is counted in the
application's metrics and logged as one access line naming the token's name (never the token). The docs are served
from packaged assets (fastapi-offline): they render with no network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from serving.auth import UNNAMED, check_bearer
from serving.codec import MEDIA_TYPES, as_base64
from serving.jobs import FINISHED
from serving.requests import ErrorBody, RequestError, RestoreRequest

log = logging.getLogger("ray.serve.restoray")  # under Serve's logger: its log files and its request id on every line
# Module level: FastAPI resolves the dependency's annotation by name (this module uses postponed annotations).
BEARER = HTTPBearer(auto_error=False, description="a token of serve.tokens_env / serve.token_file")
STREAM_WAIT_S = 10.0  # an event stream sends a keep-alive state at least this often
UI_DIR = Path(__file__).with_name("ui")
ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503)}


class JobState(BaseModel):
    id: str
    state: str = Field(description="queued, captioning, retrieving, restoring, done, failed or cancelled")
    step: int
    total: int
    created: float
    updated: float
    expires: float = Field(description="When the job and its result are removed (Unix time).")
    error: dict[str, Any] | None = Field(None, description="failed: {status, message}")
    version: int = Field(description="Increases with every change; the event stream's event id.")


class ModelInfo(BaseModel):
    name: str
    version: str | None = Field(description="The registry version (an alias resolved), else null until a replica loads it.")
    loaded: bool = Field(description="Held by the Restorer replica that answered.")


class ModelList(BaseModel):
    default: str
    preset: str
    models: list[ModelInfo]
    replica: dict[str, Any] = Field(description="What the answering Restorer replica holds: model names and versions, SDXL bases.")


def request_id() -> str | None:
    from ray.serve import context

    try:
        return context._get_serve_request_context().request_id or None
    except Exception:  # outside a Serve request (a unit test of the app): no id
        return None


def _request_body_doc() -> dict[str, Any]:
    """OpenAPI for the two body forms the restore routes parse themselves (one route, two content types)."""
    schema = RestoreRequest.model_json_schema()
    form = {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "the image file"},
            "reference": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "ReFIR references"},
            **{
                name: {"type": "string", "description": prop.get("description", "")}
                for name, prop in schema["properties"].items()
                if name != "image"
            },
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": form}, "application/json": {"schema": schema}},
        }
    }


IMAGE_RESPONSES = {
    200: {
        "content": {media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA_TYPES.values()}
        | {"application/json": {"schema": {"type": "object", "description": "image (base64), format, width, height and the metadata"}}},
        "description": "The restored image (or, with Accept: application/json, JSON).",
    }
}


def spire_phrases() -> list[str]:
    """The restoration-prompt phrases the UI offers: each registered degradation at the middle of its severity."""
    from restoration.degradations.registry import REGISTRY
    from restoration.prompts import BLIND_PROMPT, PRECISION, PromptOp, round_parameter

    phrases = [BLIND_PROMPT]
    for kind in REGISTRY.all():
        if kind.name in PRECISION:
            middle = round_parameter(kind.name, sum(kind.severity) / 2)
            phrases.append(PromptOp(kind.name, middle).render())
        else:
            phrases.append(PromptOp(kind.phrase).render())
    return phrases


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def build_api(ingress):
    from fastapi_offline import FastAPIOffline

    config = ingress.config
    api = FastAPIOffline(
        title="restoray",
        description="Diffusion-based image restoration (SUPIR, SPIRE, ABAIR, ReFIR) on Ray Serve.",
        version="1",
        docs_url="/docs",
        redoc_url="/redoc",
        responses=ERRORS,
    )
    api.add_middleware(BodyLimit, limit=config.serve.limits.max_upload_bytes)

    @api.middleware("http")
    async def access_log(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "unrouted"
        ingress.metrics.answered(path, response.status_code)
        log.info(
            "%s %s %d %.1f ms token=%s",
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - started) * 1000,
            getattr(request.state, "token_name", "-"),
        )
        return response

    async def authorized(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> str:
        """The caller's owner key: its token's digest ("" with auth off)."""
        if not config.serve.auth:
            return ""
        status, owner = check_bearer(request.headers.get("authorization"), ingress.digests)
        if status == 401:
            raise RequestError(401, "missing bearer token: send Authorization: Bearer TOKEN")
        if status == 403:
            raise RequestError(403, "this token is not accepted")
        request.state.token_name = ingress.digests.get(owner, UNNAMED)
        return owner

    # Dependencies as defaults, not Annotated aliases: with postponed annotations FastAPI resolves an annotation by
    # name in this module's globals, where a local alias is not.
    async def admitted(owner: str = Depends(authorized)) -> str:
        """`authorized`, then the token's restores per minute ([serve.limits] requests_per_minute, counted on the
        board for every ingress replica): the limit is on the routes that start a restoration, not on reads."""
        per_minute = config.serve.limits.requests_per_minute
        if per_minute:
            wait_s = await ingress.board.admit.remote(owner, per_minute)
            if wait_s > 0:
                raise RequestError(429, f"over this token's {per_minute} restores per minute; retry in {wait_s:.0f} s", retry_after=wait_s)
        return owner

    @api.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        headers = {}
        if err.status in (429, 503):
            headers["Retry-After"] = str(max(1, round(err.retry_after if err.retry_after is not None else config.serve.retry_after_s)))
        if err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(dict(err.body(), request_id=request_id()), status_code=err.status, headers=headers)

    @api.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body = {"error": f"internal error ({type(err).__name__}); the service's log has it", "field": None, "request_id": request_id()}
        return JSONResponse(body, status_code=500)

    api.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

    @api.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(UI_DIR / "index.html")

    @api.get("/healthz", summary="The ingress is up (open)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Every deployment of the application is up (open); never queues behind restorations")
    async def readyz() -> JSONResponse:
        statuses = await ingress.deployment_statuses()
        ready = bool(statuses) and all(status == "HEALTHY" for status in statuses.values())
        return JSONResponse({"status": "ready" if ready else "not ready", "deployments": statuses}, status_code=200 if ready else 503)

    @api.get("/v1/models", summary="The models a request may name, with their versions", response_model=ModelList)
    async def models(owner: str = Depends(authorized)) -> dict[str, Any]:
        replica = await ingress.call(ingress.restorer.models.remote())
        loaded = dict(replica["models"])
        listed = []
        for name in ingress.catalog.names():
            ref = await ingress.model(name)
            listed.append({"name": name, "version": loaded.get(name, ref.version), "loaded": name in loaded})
        return {"default": "default", "preset": config.preset, "models": listed, "replica": replica}

    @api.get("/v1/options", summary="What a request may choose (for clients and the UI)")
    async def options(owner: str = Depends(authorized)) -> dict[str, Any]:
        from restoration.sampling.presets import list_sampler_presets

        return {
            "samplers": list_sampler_presets(),
            "restoration_prompts": spire_phrases(),
            "models": ingress.catalog.names(),
            "defaults": {"sampler": config.sampler.model_dump(), "restore": config.restore.model_dump()},
            "limits": config.serve.limits.model_dump(),
            "retrieval": bool(config.serve.index),
            "output_formats": list(MEDIA_TYPES),
        }

    @api.post(
        "/v1/restore",
        summary="Restore one image",
        description="multipart/form-data (an `image` file, `reference` files, the fields as text) or application/json "
        "(`image` base64). Answers the image, or with `Accept: application/json` base64 and the metadata. The "
        "X-Restoray-Model and X-Restoray-Model-Version headers name the model and the version that served it.",
        openapi_extra=_request_body_doc(),
        responses=IMAGE_RESPONSES,
    )
    async def restore(request: Request, owner: str = Depends(admitted)) -> Response:
        started = time.perf_counter()
        call = await ingress.parse(request)
        parsed = time.perf_counter()
        result = await ingress.restore(call)
        composed = time.perf_counter()
        as_json = wants_json(request)
        data, described = await ingress.encoded(result, call.output_format, as_json)
        encoded = time.perf_counter()
        # Where the time went (W3C Server-Timing, ms): parsing, the deployments' calls (restore: the Restorer's own
        # restoration, inside compose), encoding. bench/serving.py splits the Serve overhead with it.
        timing = {
            "parse": parsed - started,
            "compose": composed - parsed,
            "restore": result["seconds"]["total"],
            "encode": encoded - composed,
        }
        headers = dict(
            ingress.headers(result), **{"Server-Timing": ", ".join(f"{name};dur={value * 1000:.2f}" for name, value in timing.items())}
        )
        if as_json:
            return Response(json.dumps(described).encode(), media_type="application/json", headers=headers)
        return Response(data, media_type=MEDIA_TYPES[call.output_format], headers=headers)

    @api.post("/v1/jobs", status_code=202, summary="Start a restore job", openapi_extra=_request_body_doc(), response_model=JobState)
    async def create_job(request: Request, owner: str = Depends(admitted)) -> dict[str, Any]:
        call = await ingress.parse(request)
        await ingress.model(call.model_name)  # an unknown model is refused now, not in the job
        call.job_id = uuid.uuid4().hex
        job = await ingress.board.create.remote(call.job_id, owner, call.sampler.steps)
        if job is None:
            raise RequestError(503, f"busy: {config.serve.max_pending_jobs} jobs are pending (serve.max_pending_jobs). Retry later.")
        ingress.jobs.start(call.job_id, ingress.run_job(call))
        return job

    async def job_or_404(job_id: str, owner: str) -> dict[str, Any]:
        job = await ingress.board.state.remote(job_id, owner)
        if job is None:
            raise no_job(job_id)
        return job

    @api.get("/v1/jobs/{job_id}", summary="A job's state and step/total", response_model=JobState)
    async def job_state(job_id: str, owner: str = Depends(authorized)) -> dict[str, Any]:
        return await job_or_404(job_id, owner)

    @api.get(
        "/v1/jobs/{job_id}/events",
        response_model=None,
        responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "state events"}},
        summary="A job's progress as server-sent events (resumable with Last-Event-ID)",
        description="One `state` event per change (JobState as JSON, id = its version), then the stream ends when the "
        "job is done, failed or cancelled. A reconnect with Last-Event-ID gets only newer states.",
    )
    async def job_events(
        job_id: str, owner: str = Depends(authorized), last_event_id: str | None = Header(None, alias="Last-Event-ID")
    ) -> Response:
        first = await job_or_404(job_id, owner)
        if ingress.open_streams >= config.serve.max_event_streams:
            raise RequestError(503, f"busy: {config.serve.max_event_streams} event streams are open on this replica. Retry later.")
        after = int(last_event_id) if last_event_id and last_event_id.isdigit() else -1
        return EventSourceResponse(_stream(job_id, owner, first, after), headers={"Cache-Control": "no-cache"})

    async def _stream(job_id: str, owner: str, job: dict[str, Any], after: int) -> AsyncIterator[bytes]:
        ingress.open_streams += 1
        try:
            while True:
                if job["version"] > after:
                    after = job["version"]
                    yield format_sse_event(data_str=json.dumps(job), event="state", id=str(after))
                if job["state"] in FINISHED:
                    return
                job = await ingress.board.wait.remote(job_id, owner, after, STREAM_WAIT_S)
                if job is None:  # expired meanwhile
                    return
                if job["version"] <= after:
                    yield b": keep-alive\n\n"
        finally:
            ingress.open_streams -= 1

    @api.get("/v1/jobs/{job_id}/result", summary="A finished job's image (or JSON)", responses=IMAGE_RESPONSES)
    async def job_result(request: Request, job_id: str, owner: str = Depends(authorized)) -> Response:
        job = await job_or_404(job_id, owner)
        if job["state"] != "done":
            detail = f" ({job['error']['message']})" if job.get("error") else ""
            raise RequestError(409, f"job {job_id} is {job['state']}{detail}: no result", "id")
        stored = await asyncio.to_thread(ingress.jobs.store.read_result, job_id)
        if stored is None:
            raise RequestError(404, f"job {job_id}: its result expired", "id")
        data, meta = stored
        if wants_json(request):
            body = {key: value for key, value in meta.items() if key not in ("headers", "media_type")}
            return JSONResponse(dict(body, image=as_base64(data)), headers=meta["headers"])
        return Response(data, media_type=meta["media_type"], headers=meta["headers"])

    @api.delete("/v1/jobs/{job_id}", summary="Cancel a job (it stops at its next step)", response_model=JobState)
    async def cancel_job(job_id: str, owner: str = Depends(authorized)) -> dict[str, Any]:
        job = await ingress.board.cancel.remote(job_id, owner)
        if job is None:
            raise no_job(job_id)
        return job

    return api


def no_job(job_id: str) -> RequestError:
    """One answer for a job that is unknown, another token's or expired: a caller cannot tell them apart."""
    return RequestError(404, f"no job {job_id!r} (unknown, another token's, or expired)", "id")


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes from Content-Length, and count while the body streams (a
    client may send more than it declared, or no length at all)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, f"body: {int(declared):,} bytes declared, over the limit of {self.limit:,}")
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, f"body: over the limit of {self.limit:,} bytes")

    @staticmethod
    async def _refuse(send, message: str):
        response = JSONResponse({"error": message, "field": "body", "request_id": request_id()}, status_code=413)
        await response({"type": "http"}, None, send)
