"""The HTTP API of the ingress (FastAPI, built on each ingress replica by `Ingress.__serve_build_asgi_app__`).

Auth: /v1/* needs `Authorization: Bearer TOKEN` when [serve] auth is on (401 without, 403 for a wrong one); the
probes, the docs and the web UI are open (the UI asks for the token). Errors are JSON {"error", "field"}.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from serving.auth import check_bearer
from serving.deployments import CANCELLED
from serving.requests import RequestError, RestoreRequest

log = logging.getLogger(__name__)
# Module level: FastAPI resolves the dependency's annotation by name (this module uses postponed annotations).
BEARER = HTTPBearer(auto_error=False, description="a token of serve.tokens_env / serve.token_file")


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


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def build_api(ingress) -> FastAPI:
    from serving.app import MEDIA_TYPES, UI_DIR, BodyLimit, encode_image, spire_phrases

    config = ingress.config
    api = FastAPI(
        title="restoray",
        description="Diffusion-based image restoration (SUPIR, SPIRE, ABAIR, ReFIR) on Ray Serve.",
        version="1",
        docs_url="/docs",
    )
    api.add_middleware(BodyLimit, limit=config.serve.limits.max_upload_bytes)

    async def authorized(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if not config.serve.auth:
            return
        status = check_bearer(request.headers.get("authorization"), ingress.digests)
        if status == 401:
            raise RequestError(401, "missing bearer token: send Authorization: Bearer TOKEN")
        if status == 403:
            raise RequestError(403, "this token is not accepted")

    @api.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        headers = {}
        if err.status == 503:
            headers["Retry-After"] = str(max(1, round(config.serve.retry_after_s)))
        if err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    api.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

    @api.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(UI_DIR / "index.html")

    @api.get("/healthz", summary="The ingress is up (open)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="The default model is loaded and the deployments answer (open)")
    async def readyz() -> JSONResponse:
        try:
            ready = await asyncio.wait_for(ingress.restorer.options(multiplexed_model_id=ingress.default_model).ready.remote(), 60)
        except Exception as err:  # not ready, for whatever reason: the probe says so
            return JSONResponse({"status": "not ready", "error": f"{type(err).__name__}: {err}"}, status_code=503)
        if "error" in ready:
            return JSONResponse({"status": "not ready", "error": ready["error"]["message"]}, status_code=503)
        return JSONResponse({"status": "ready", "model": ready["model"]})

    @api.get("/v1/models", dependencies=[Depends(authorized)], summary="The default model and what a Restorer replica holds")
    async def models() -> dict[str, Any]:
        replica = await ingress.call(ingress.restorer.models.remote())
        return {"default": ingress.default_model, "preset": config.preset, "replica": replica}

    @api.get("/v1/options", dependencies=[Depends(authorized)], summary="What a request may choose (for clients and the UI)")
    async def options() -> dict[str, Any]:
        from restoration.sampling.presets import list_sampler_presets

        return {
            "samplers": list_sampler_presets(),
            "restoration_prompts": spire_phrases(),
            "defaults": {"sampler": config.sampler.model_dump(), "restore": config.restore.model_dump()},
            "limits": config.serve.limits.model_dump(),
            "retrieval": bool(config.serve.index),
            "output_formats": list(MEDIA_TYPES),
        }

    def answer(request: Request, result: dict[str, Any], output_format: str) -> Response:
        headers = ingress.headers(result)
        if wants_json(request):
            return JSONResponse(ingress.describe(result, output_format), headers=headers)
        return Response(encode_image(result["image"], output_format), media_type=MEDIA_TYPES[output_format], headers=headers)

    @api.post(
        "/v1/restore",
        dependencies=[Depends(authorized)],
        summary="Restore one image",
        description="multipart/form-data (an `image` file, `reference` files, the fields as text) or application/json "
        "(`image` base64). Answers the image, or with `Accept: application/json` base64 and the metadata. The "
        "X-Restoray-Model and X-Restoray-Model-Version headers name the model version that served it.",
        openapi_extra=_request_body_doc(),
    )
    async def restore(request: Request) -> Response:
        parsed = await ingress.parse(request)
        result = await ingress.restore(parsed)
        return answer(request, result, parsed.request.output_format)

    @api.post(
        "/v1/jobs", dependencies=[Depends(authorized)], status_code=202, summary="Start a restore job", openapi_extra=_request_body_doc()
    )
    async def create_job(request: Request) -> dict[str, Any]:
        parsed = await ingress.parse(request)
        job_id = uuid.uuid4().hex
        await ingress.board.create.remote(job_id, parsed.sampler.steps)
        task = asyncio.create_task(run_job(job_id, parsed))
        ingress.jobs.add(task)
        task.add_done_callback(ingress.jobs.discard)
        return {"id": job_id, "state": "queued", "total": parsed.sampler.steps}

    async def run_job(job_id: str, parsed) -> None:
        try:
            result = await ingress.restore(parsed, job_id)
        except RequestError as err:
            if err.status != CANCELLED:
                await ingress.board.fail.remote(job_id, err.status, err.message)
            return
        except Exception as err:  # the job fails, with its reason; the ingress goes on
            log.exception("job %s failed", job_id)
            await ingress.board.fail.remote(job_id, 500, f"{type(err).__name__}: {err}")
            return
        described = ingress.describe(result, parsed.request.output_format)
        described["headers"] = ingress.headers(result)
        await ingress.board.finish.remote(job_id, described)

    async def job_or_404(job_id: str) -> dict[str, Any]:
        job = await ingress.board.state.remote(job_id)
        if job is None:
            raise RequestError(404, f"no job {job_id!r} (unknown, or finished long enough ago to be dropped)", "id")
        return job

    @api.get("/v1/jobs/{job_id}", dependencies=[Depends(authorized)], summary="A job's state and step/total")
    async def job_state(job_id: str) -> dict[str, Any]:
        return await job_or_404(job_id)

    @api.get("/v1/jobs/{job_id}/result", dependencies=[Depends(authorized)], summary="A finished job's image (or JSON)")
    async def job_result(request: Request, job_id: str) -> Response:
        job = await job_or_404(job_id)
        if job["state"] != "done":
            detail = f" ({job['error']['message']})" if job.get("error") else ""
            raise RequestError(409, f"job {job_id} is {job['state']}{detail}: no result", "id")
        result = await ingress.board.result.remote(job_id)
        if wants_json(request):
            return JSONResponse({key: value for key, value in result.items() if key != "headers"}, headers=result["headers"])
        return Response(base64.b64decode(result["image"]), media_type=MEDIA_TYPES[result["format"]], headers=result["headers"])

    @api.delete("/v1/jobs/{job_id}", dependencies=[Depends(authorized)], summary="Cancel a job (it stops at its next step)")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        job = await ingress.board.cancel.remote(job_id)
        if job is None:
            raise RequestError(404, f"no job {job_id!r}", "id")
        return job

    return api
