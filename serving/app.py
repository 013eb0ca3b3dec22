"""The Ray Serve application: a FastAPI ingress over the Restorer, Captioner and Retriever deployments.

    POST /v1/restore        image (multipart file or JSON base64) + fields -> the image, or JSON with the metadata
    POST /v1/jobs           same body -> {id}; GET /v1/jobs/{id} (state, step/total), GET /v1/jobs/{id}/result,
                            DELETE /v1/jobs/{id} (cancel: the sampler stops at its next step)
    GET  /v1/models, /v1/options, /healthz, /readyz, /docs, /openapi.json, / (the web UI, packaged in serving/ui/)

The ingress composes the model deployments through the Restorer API: `stage1` (when a caption or retrieval needs the
stage-1 image), the Captioner and the Retriever on it in parallel, then `restore(prompt, references)`. Models are
multiplexed by id (the `model` field, or the `serve_multiplexed_model_id` header). Jobs live in the JobBoard, a named
detached actor (serving/jobs.py). A full downstream queue raises BackPressureError here: 503 with Retry-After.
Serve's proxy answers 408 past request_timeout_s and 503 when the ingress's own queue is full.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError

from serving.config import AppConfig, DeploymentSettings
from serving.deployments import CANCELLED, Captioner, Retriever, restorer_deployment
from serving.jobs import BOARD_NAME, JobBoard
from serving.requests import (
    FORM_FILE_FIELDS,
    RequestError,
    check_request,
    decode_base64,
    decode_upload,
    form_request,
    parse_json_body,
)

UI_DIR = Path(__file__).with_name("ui")
MODEL_HEADER = "serve_multiplexed_model_id"
APP_NAME = "restoray"
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


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
        from fastapi.responses import JSONResponse

        response = JSONResponse({"error": message, "field": "body"}, status_code=413)
        await response({"type": "http"}, None, send)


def encode_image(image: np.ndarray, output_format: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    options = {"quality": 95} if output_format in ("jpeg", "webp") else {}
    Image.fromarray(image).save(buffer, format=output_format.upper(), **options)
    return buffer.getvalue()


def thumbnail(image: np.ndarray, side: int = 160) -> str:
    from PIL import Image

    picture = Image.fromarray(image)
    picture.thumbnail((side, side))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


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


@serve.ingress()
class Ingress:
    def __init__(self, restorer, captioner, retriever, app_config: dict, token_digests: list[str]):
        self.config = AppConfig.model_validate(app_config)
        self.restorer, self.captioner, self.retriever = restorer, captioner, retriever
        self.digests = token_digests
        self.default_model = self.config.serve.weights or self.config.preset
        self.board = (
            ray.remote(JobBoard)
            .options(name=BOARD_NAME, get_if_exists=True, lifetime="detached", num_cpus=0)
            .remote(self.config.serve.jobs_kept)
        )
        self.jobs: set[asyncio.Task] = set()

    def __serve_build_asgi_app__(self):
        from serving.api import build_api

        return build_api(self)

    # ---- the composition --------------------------------------------------------------------------------------
    async def call(self, response):
        """Await a downstream call; a full queue there is 503 + Retry-After, a refusal its own status."""
        try:
            reply = await response
        except BackPressureError as err:
            raise RequestError(503, f"busy: {err} Retry later.", None) from None
        if isinstance(reply, dict) and "error" in reply:
            error = reply["error"]
            raise RequestError(error["status"], error["message"])
        return reply

    async def restore(self, parsed, job_id: str | None = None) -> dict[str, Any]:
        model_id = parsed.model or self.default_model
        restorer = self.restorer.options(multiplexed_model_id=model_id)
        payload = dict(parsed.payload(), model=model_id, references=[])
        captioned = parsed.request.prompt is None
        auto = parsed.references == "auto"
        retrieval = None
        if captioned or auto:
            await self.job_state(job_id, "captioning" if captioned else "retrieving")
            stage1 = (await self.call(restorer.stage1.remote(parsed.image, payload["options"], model_id)))["image"]
            caption = self.captioner.caption.remote(stage1) if captioned else None
            k, threshold = parsed.options.retrieval_k, parsed.options.min_similarity
            found = self.retriever.query.remote(stage1, k) if auto else None
            if caption is not None:
                payload["prompt"] = await self.call(caption)
            if found is not None:
                await self.job_state(job_id, "retrieving")
                candidates = await self.call(found)
                used = [ref for ref in candidates if ref["similarity"] >= threshold]
                payload["references"] = used
                retrieval = {
                    "k": k,
                    "min_similarity": threshold,
                    "candidates": [
                        {"source": ref["source"], "similarity": ref["similarity"], "thumbnail": thumbnail(ref["image"])}
                        for ref in candidates
                    ],
                    "fell_back": not used,
                }
        elif parsed.references:
            payload["references"] = [
                {"image": image, "similarity": None, "source": f"upload:{i}"} for i, image in enumerate(parsed.references)
            ]
        if job_id is not None:
            payload["job"] = (self.board, job_id)
            await self.job_state(job_id, "restoring")
        result = await self.call(restorer.restore.remote(payload))
        return dict(result, captioned=captioned, retrieval=retrieval)

    async def job_state(self, job_id: str | None, state: str) -> None:
        if job_id is not None and not await self.board.set_state.remote(job_id, state):
            raise RequestError(CANCELLED, f"job {job_id} was cancelled")

    def describe(self, result: dict[str, Any], output_format: str) -> dict[str, Any]:
        """The JSON answer: the image as base64 and the Restoration's metadata."""
        image = result["image"]
        return {
            "image": base64.b64encode(encode_image(image, output_format)).decode("ascii"),
            "format": output_format,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            **{key: value for key, value in result.items() if key != "image"},
        }

    def headers(self, result: dict[str, Any]) -> dict[str, str]:
        model = result["model"]
        return {"X-Restoray-Model": model["uri"], "X-Restoray-Model-Version": str(model["version"]), "X-Restoray-Seed": str(result["seed"])}

    # ---- parsing ----------------------------------------------------------------------------------------------
    async def parse(self, request) -> Any:
        """The request's body (JSON or multipart) as a checked ParsedRequest; the model from the `model` field or
        Serve's multiplexing header."""
        parsed = await self._parse_body(request)
        parsed.model = parsed.model or request.headers.get(MODEL_HEADER) or None
        return parsed

    async def _parse_body(self, request) -> Any:
        limits = self.config.serve.limits
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            body = parse_json_body(await request.body())
            if body.image is None:
                raise RequestError(422, "image: missing (base64 in the JSON body)", "image")
            image = decode_upload(decode_base64(body.image, "image"), "image", limits)
            references: Any = body.references
            if isinstance(references, list):
                references = [
                    decode_upload(decode_base64(text, f"references[{i}]"), f"references[{i}]", limits) for i, text in enumerate(references)
                ]
        elif content_type == "multipart/form-data":
            from starlette.datastructures import UploadFile
            from starlette.formparsers import MultiPartException

            try:
                form = await request.form(max_files=1 + limits.max_references, max_fields=32, max_part_size=limits.max_upload_bytes)
            except MultiPartException as err:
                raise RequestError(400, f"body: not a usable multipart form ({err.message})") from None
            fields, files = {}, {"image": [], "reference": []}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in FORM_FILE_FIELDS:
                        raise RequestError(422, f"{key}: unexpected file part (files go in {', '.join(FORM_FILE_FIELDS)})", key)
                    files[key].append(await value.read())
                else:
                    fields[key] = value
            if fields.get("references") == "upload":
                fields.pop("references")
            body = form_request(fields)
            if len(files["image"]) != 1:
                raise RequestError(422, f"image: send exactly one image file part (got {len(files['image'])})", "image")
            image = decode_upload(files["image"][0], "image", limits)
            references = [decode_upload(data, f"reference[{i}]", limits) for i, data in enumerate(files["reference"])]
            if references and body.references != "none":
                raise RequestError(422, "references: uploaded reference files and references=auto exclude each other", "references")
            references = references or body.references
        else:
            raise RequestError(415, f"Content-Type {content_type or 'missing'!r}: send multipart/form-data or application/json")
        if references == "none":
            references = []
        return check_request(body, image, references, self.config)


def deployment_options(settings: DeploymentSettings, config: AppConfig) -> dict[str, Any]:
    """Serve options of one deployment from its [serve.*] settings."""
    return {
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        "autoscaling_config": {
            "min_replicas": settings.min_replicas,
            "initial_replicas": settings.min_replicas,  # 0: started by the first request (Serve scales up from zero)
            "max_replicas": max(settings.max_replicas, settings.min_replicas, 1),
            "target_ongoing_requests": settings.target_ongoing_requests,
        },
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=config.serve.retry_after_s),
    }


def build_app(config: AppConfig, token_digests: list[str] | None = None):
    """The bound application. `token_digests` None: read the tokens [serve] names (environment or file) here."""
    from serving.auth import accepted_digests

    digests = accepted_digests(config.serve) if token_digests is None else token_digests
    args = config.model_dump(mode="json")
    serve_config = config.serve
    restorer = serve.deployment(restorer_deployment(config), name="Restorer", **deployment_options(serve_config.restorer, config)).bind(
        args
    )
    captioner = serve.deployment(Captioner, name="Captioner", **deployment_options(serve_config.captioner, config)).bind(
        config.preset, serve_config.captioner.num_gpus, config.restore.dtype
    )
    retriever = None
    if serve_config.index:
        retriever = serve.deployment(Retriever, name="Retriever", **deployment_options(serve_config.retriever, config)).bind(
            serve_config.index, args
        )
    ingress = serve.deployment(Ingress, name="Ingress", **deployment_options(serve_config.ingress, config))
    return ingress.bind(restorer, captioner, retriever, args, digests)


def app_builder(args: dict[str, Any]):
    """`serve run` / `serve deploy` entry (serving/config.yaml: import_path serving.app:app_builder, args = AppConfig)."""
    return build_app(AppConfig.model_validate(args))


def deploy_config(config: AppConfig) -> dict[str, Any]:
    """serving/config.yaml: Serve's config file for this AppConfig (`restoray serve --write-config PATH`)."""
    deployments = []
    for name, settings in (("Ingress", config.serve.ingress), ("Restorer", config.serve.restorer), ("Captioner", config.serve.captioner)):
        options = deployment_options(settings, config)
        options["backpressure_config"] = options["backpressure_config"].model_dump()
        deployments.append({"name": name, **options})
    if config.serve.index:
        options = deployment_options(config.serve.retriever, config)
        options["backpressure_config"] = options["backpressure_config"].model_dump()
        deployments.append({"name": "Retriever", **options})
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.serve.host, "port": config.serve.port, "request_timeout_s": config.serve.request_timeout_s},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "serving.app:app_builder",
                "args": config.model_dump(mode="json"),
                "deployments": deployments,
            }
        ],
    }
