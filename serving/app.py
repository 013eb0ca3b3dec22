"""The Ray Serve application: a FastAPI ingress over the Restorer, Captioner and Retriever deployments.

    POST /v1/restore        image (multipart file or JSON base64) + fields -> the image, or JSON with the metadata
    POST /v1/jobs           same body -> {id}; GET /v1/jobs/{id} (state, step/total), GET /v1/jobs/{id}/events
                            (server-sent events), GET /v1/jobs/{id}/result, DELETE /v1/jobs/{id} (cancel)
    GET  /v1/models, /v1/options, /healthz, /readyz, /docs, /redoc, /openapi.json, / (the web UI, serving/ui/)

The ingress (`Ingress`, its routes in serving/api.py) parses a request into one `RestoreCall` off its event loop,
resolves the model name (serving/models.py: names only, aliases pinned to a version), and composes the model
deployments: `stage1` (when a caption or retrieval needs the stage-1 image), the Captioner and the Retriever on it in
parallel, then `restore(call)`; the answer is encoded off the loop too. Jobs (serving/jobs.py) run as tasks of the
ingress replica under a lease on the application's job board. A full downstream queue raises BackPressureError
here: 503 with Retry-After. Serve's proxy answers 408 past request_timeout_s and 503 when the ingress's own queue
is full.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError

from restoration.errors import InputError
from serving.api import build_api
from serving.catalog import ModelCatalog, ModelRef, UnknownModel
from serving.codec import MEDIA_TYPES, as_base64, encode_image, off_loop
from serving.config import DEFAULT_MODEL, AppConfig, DeploymentSettings
from serving.deployments import CANCELLED, Captioner, Retriever, app_name, restorer_deployment
from serving.jobs import JobRunner, JobStore, job_board, jobs_root
from serving.requests import Reference, RequestError, RestoreCall

MODEL_HEADER = "serve_multiplexed_model_id"
APP_NAME = "restoray"
log = logging.getLogger("ray.serve.restoray")  # under Serve's logger: its log files, its request ids


@serve.ingress()
class Ingress:
    def __init__(self, restorer, captioner, retriever, app_config: dict, token_digests: dict[str, str]):
        from serving.metrics import IngressMetrics

        self.config = AppConfig.model_validate(app_config)
        self.restorer, self.captioner, self.retriever = restorer, captioner, retriever
        self.digests = token_digests  # {sha256 of a token: its name}
        self.catalog = ModelCatalog(self.config)
        self.app_name = app_name()
        self.board = job_board(self.app_name, self.config.serve, self.config.storage)
        self.jobs = JobRunner(
            self.board, JobStore(jobs_root(self.config.serve, self.app_name), self.config.storage), self.config.serve.job_lease_s
        )
        self.metrics = IngressMetrics()
        self.open_streams = 0

    def __serve_build_asgi_app__(self):
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

    async def model(self, name: str | None) -> ModelRef:
        """The model a request names, resolved (404 listing the names for anything else)."""
        try:
            if "@" not in self.catalog.uris.get(name or DEFAULT_MODEL, ""):
                return self.catalog.resolve(name)  # no alias, so no registry lookup: nothing to wait for
            return await off_loop(self.catalog.resolve, name)
        except UnknownModel as err:
            raise RequestError(404, str(err), "model") from None
        except InputError as err:
            log.error("model %r: the registry could not resolve it: %s", name, err)
            raise RequestError(503, f"model {name!r}: the model registry cannot be reached now. Retry later.", "model") from None

    async def restore(self, call: RestoreCall) -> dict[str, Any]:
        call.model = await self.model(call.model_name)
        restorer = self.restorer.options(multiplexed_model_id=call.model.model_id)
        retrieval = None
        if call.captioned or call.references == "auto":
            await self.job_state(call.job_id, "captioning" if call.captioned else "retrieving")
            stage1 = (await self.call(restorer.stage1.remote(call)))["image"]
            caption = self.captioner.caption.remote(stage1) if call.captioned else None
            k, threshold = call.options.retrieval_k, call.options.min_similarity
            found = self.retriever.query.remote(stage1, k) if call.references == "auto" else None
            if caption is not None:
                call.prompt = await self.call(caption)
            if found is not None:
                await self.job_state(call.job_id, "retrieving")
                candidates = await self.call(found)
                call.references = [
                    Reference(ref["image"], ref["similarity"], ref["source"]) for ref in candidates if ref["similarity"] >= threshold
                ]
                retrieval = {
                    "k": k,
                    "min_similarity": threshold,
                    "candidates": [
                        {"source": ref["source"], "similarity": ref["similarity"], "thumbnail": ref["thumbnail"]} for ref in candidates
                    ],
                    "fell_back": not call.references,
                }
        await self.job_state(call.job_id, "restoring")
        result = await self.call(restorer.restore.remote(call))
        return dict(result, captioned=call.captioned, retrieval=retrieval)

    async def job_state(self, job_id: str | None, state: str) -> None:
        if job_id is not None and not await self.board.set_state.remote(job_id, state):
            raise RequestError(CANCELLED, f"job {job_id} was cancelled")

    @staticmethod
    def headers(result: dict[str, Any]) -> dict[str, str]:
        model = result["model"]
        return {
            "X-Restoray-Model": model["name"],
            "X-Restoray-Model-Version": str(model["version"]),
            "X-Restoray-Seed": str(result["seed"]),
        }

    @staticmethod
    def described(result: dict[str, Any], output_format: str) -> dict[str, Any]:
        """The JSON answer's fields but the image (a job stores them beside its result file)."""
        image = result["image"]
        return {
            "format": output_format,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            **{key: value for key, value in result.items() if key != "image"},
        }

    @staticmethod
    def _encoded(result: dict[str, Any], output_format: str, as_json: bool) -> tuple[bytes, dict[str, Any] | None]:
        """The image in its format, and (as_json) the JSON answer around it: CPU work, run off the loop."""
        data = encode_image(result["image"], output_format)
        if not as_json:
            return data, None
        return data, {"image": as_base64(data), **Ingress.described(result, output_format)}

    async def encoded(self, result: dict[str, Any], output_format: str, as_json: bool) -> tuple[bytes, dict[str, Any] | None]:
        return await off_loop(self._encoded, result, output_format, as_json)

    async def deployment_statuses(self) -> dict[str, str]:
        """{deployment: Serve's status} of this application, from Serve's controller (not through any replica's
        queue: a busy Restorer is still ready)."""
        status = await off_loop(serve.status)
        application = status.applications.get(self.app_name)
        if application is None:
            return {}
        return {name: str(getattr(deployment.status, "value", deployment.status)) for name, deployment in application.deployments.items()}

    # ---- jobs -------------------------------------------------------------------------------------------------
    async def run_job(self, call: RestoreCall) -> None:
        job_id = call.job_id
        try:
            result = await self.restore(call)
            data, _ = await self.encoded(result, call.output_format, as_json=False)  # no base64: the file holds the bytes
            meta = dict(
                self.described(result, call.output_format), headers=self.headers(result), media_type=MEDIA_TYPES[call.output_format]
            )
            await self.jobs.done(job_id, data, meta)
        except RequestError as err:
            if err.status != CANCELLED:
                await self.jobs.failed(job_id, err.status, err.message)
        except asyncio.CancelledError:
            await asyncio.shield(self.jobs.failed(job_id, 500, "the ingress replica running it is stopping"))
            raise
        except Exception as err:  # the job fails, with its reason; the ingress goes on
            log.exception("job %s failed", job_id)
            await self.jobs.failed(job_id, 500, f"{type(err).__name__}: {err}")

    # ---- parsing ----------------------------------------------------------------------------------------------
    async def parse(self, request) -> RestoreCall:
        """The request's body (JSON or multipart) as a checked RestoreCall, decoded off the event loop; the model
        from the `model` field or Serve's multiplexing header."""
        from serving.requests import FORM_FILE_FIELDS, parse_form, parse_json

        limits = self.config.serve.limits
        header_model = request.headers.get(MODEL_HEADER) or None
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            return await off_loop(parse_json, await request.body(), self.config, header_model)
        if content_type == "multipart/form-data":
            from starlette.datastructures import UploadFile
            from starlette.formparsers import MultiPartException

            try:
                form = await request.form(max_files=1 + limits.max_references, max_fields=32, max_part_size=limits.max_upload_bytes)
            except MultiPartException as err:
                raise RequestError(400, f"body: not a usable multipart form ({err.message})") from None
            fields: dict[str, str] = {}
            files: dict[str, list[bytes]] = {name: [] for name in FORM_FILE_FIELDS}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in FORM_FILE_FIELDS:
                        raise RequestError(422, f"{key}: unexpected file part (files go in {', '.join(FORM_FILE_FIELDS)})", key)
                    files[key].append(await value.read())
                else:
                    fields[key] = value
            return await off_loop(parse_form, fields, files, self.config, header_model)
        raise RequestError(415, f"Content-Type {content_type or 'missing'!r}: send multipart/form-data or application/json")


def deployment_options(settings: DeploymentSettings, config: AppConfig) -> dict[str, Any]:
    """Serve options of one deployment from its [serve.*] settings."""
    target = settings.target_ongoing_requests
    if target is None:  # the Restorer aims at full batches: below max_batch_size replicas are added before one fills
        target = float(config.serve.max_batch_size) if settings is config.serve.restorer else 2.0
    return {
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        "autoscaling_config": {
            "min_replicas": settings.min_replicas,
            "initial_replicas": settings.min_replicas,  # 0: started by the first request (Serve scales up from zero)
            "max_replicas": max(settings.max_replicas, settings.min_replicas, 1),
            "target_ongoing_requests": target,
            "upscale_delay_s": settings.upscale_delay_s,
            "downscale_delay_s": settings.downscale_delay_s,
        },
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_timeout_s,
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=config.serve.retry_after_s),
        # The ingress writes its own access line (with the token's name); Serve's would repeat it.
        "logging_config": {"enable_access_log": settings is not config.serve.ingress},
    }


def build_app(config: AppConfig, token_digests: dict[str, str] | None = None):
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
