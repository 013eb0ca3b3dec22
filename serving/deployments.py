"""The model deployments: Restorer (diffusion; multiplexed model versions on one SDXL base; batched), Captioner (the
preset's VLM on its own replicas, so a diffusion replica never holds it) and Retriever (index + reference store).

Each replica runs its model calls on one worker thread: the event loop stays free to queue, batch and notice
cancellations, and the shared base (whose attention processors a ReFIR chain swaps) sees one restore at a time.
Replies are plain data (arrays, dicts); a refusal comes back as {"error": {"status", "message"}}, never raised
across the process boundary."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
from ray import serve

from restoration.errors import InputError, RestorationCancelled
from serving.config import AppConfig

log = logging.getLogger(__name__)
CANCELLED = 499  # nginx's "client closed request": the caller went away or cancelled the job


def _error(status: int, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "message": message}}


def _device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


class _Worker:
    """One thread for model calls (see the module docstring)."""

    def __init__(self, name: str):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def restorer_deployment(config: AppConfig):
    """The Restorer deployment class, its LRU size and batch size taken from `config` (decorator arguments)."""
    serve_config = config.serve

    class Restorer:
        def __init__(self, app_config: dict):
            from serving.models import ModelStore

            self.config = AppConfig.model_validate(app_config)
            self.device = _device(self.config.serve.restorer.num_gpus)
            restore = self.config.restore
            self.store = ModelStore(self.config.storage, self.config.mlflow, self.device, restore.dtype, restore.offload)
            self.default_model = self.config.serve.weights or self.config.preset
            self.worker = _Worker("restore")
            self.loaded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # what Serve's LRU still holds
            self.cancelled = 0  # restorations stopped by a cancel flag (a job's, or a disconnected client's)

        @serve.multiplexed(max_num_models_per_replica=serve_config.models_per_replica)
        async def get_model(self, model_id: str):
            model = await self.worker.run(self._load, model_id or self.default_model)
            self.loaded[model.uri] = model
            return model

        def _load(self, model_id: str):
            return self.store.load(model_id)  # on the replica's device, in restore.dtype

        async def _model(self, model_id: str):
            try:
                return await self.get_model(model_id or self.default_model), None
            except InputError as err:
                return None, _error(422, f"model: {err}")

        async def ready(self) -> dict[str, Any]:
            model, error = await self._model(self.default_model)
            return error or {"model": model.describe()}

        async def models(self) -> dict[str, Any]:
            return self.replica()

        def replica(self) -> dict[str, Any]:
            loaded = list(self.loaded.values())
            return {
                "models": sorted(model.uri for model in loaded),
                # Distinct SDXL UNets among the loaded versions: one per preset when they share the base.
                "sdxl_bases": len({id(model.restorer.networks.unet) for model in loaded}),
                "cancelled": self.cancelled,
            }

        async def stage1(self, image: np.ndarray, options: dict, model_id: str) -> dict[str, Any]:
            """SUPIR's stage 1 at the working size `restore` will use: the image the Captioner and Retriever see."""
            model, error = await self._model(model_id)
            if error:
                return error
            return await self.worker.run(self._stage1, model.restorer, image, options)

        @staticmethod
        def _stage1(restorer, image: np.ndarray, options: dict) -> dict[str, Any]:
            from PIL import Image

            from restoration.settings import RestoreConfig

            restore_options = RestoreConfig.model_validate(options)
            picture = Image.fromarray(image)
            output = (max(1, round(picture.width * restore_options.upscale)), max(1, round(picture.height * restore_options.upscale)))
            stage = restorer.stage1(restorer.working_image(picture, output, restore_options), restore_options)
            return {"image": np.asarray(stage.image)}

        async def restore(self, payload: dict[str, Any]) -> dict[str, Any]:
            """One request; alone when it has references, else through the batch. A cancelled call (the client went
            away, Serve cancels this coroutine) sets the request's flag, which the sampler reads at its next step."""
            payload = dict(payload, cancel=threading.Event())
            try:
                if payload.get("references"):
                    model, error = await self._model(payload["model"])
                    return error or (await self.worker.run(self._restore_group, model, [payload]))[0]
                return await self._batched(payload)
            except asyncio.CancelledError:
                payload["cancel"].set()
                raise

        @serve.batch(max_batch_size=serve_config.max_batch_size, batch_wait_timeout_s=serve_config.batch_wait_timeout_s)
        async def _batched(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # Serve splits batches by multiplexed model id: one model per call.
            model, error = await self._model(payloads[0]["model"])
            if error:
                return [error] * len(payloads)
            groups: dict[Any, list[int]] = {}
            for position, payload in enumerate(payloads):
                groups.setdefault(self._group_key(model.restorer, payload, position), []).append(position)
            results: list[dict[str, Any] | None] = [None] * len(payloads)
            for positions in groups.values():
                replies = await self.worker.run(self._restore_group, model, [payloads[p] for p in positions])
                for position, reply in zip(positions, replies, strict=True):
                    results[position] = reply
            return results

        @staticmethod
        def _group_key(restorer, payload: dict[str, Any], position: int):
            """Requests that can share one forward pass: one working size, sampler, options (but seed and restoration
            prompt, which are per sample) and expert weights. With experts blended by the estimator the weights depend
            on the image, so such a request runs alone."""
            from restoration.settings import RestoreConfig

            experts = payload["expert_weights"] or payload["options"]["expert_weights"]
            if restorer.experts and not isinstance(experts, dict):
                return ("alone", position)
            options = RestoreConfig.model_validate(payload["options"])
            height, width = payload["image"].shape[:2]
            shared = {key: value for key, value in payload["options"].items() if key not in ("seed", "restoration_prompt")}
            return (
                restorer.batch_key((width, height), options),
                json.dumps(payload["sampler"], sort_keys=True),
                json.dumps(shared, sort_keys=True),
                json.dumps(experts, sort_keys=True),
            )

        def _restore_group(self, model, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
            from PIL import Image

            from restoration.restorer import ReferenceUsed
            from restoration.settings import RestoreConfig, SamplerConfig

            restorer = model.restorer
            first = payloads[0]
            sampler = SamplerConfig.model_validate(first["sampler"])
            options = RestoreConfig.model_validate(first["options"])
            images = [Image.fromarray(payload["image"]) for payload in payloads]

            def on_step(info) -> None:
                for payload in payloads:
                    job = payload.get("job")
                    if job is not None and ray.get(job[0].progress.remote(job[1], info.index + 1, info.steps)):
                        payload["cancel"].set()
                if all(payload["cancel"].is_set() for payload in payloads):
                    info.cancel()

            try:
                if len(payloads) == 1:
                    references = [
                        ReferenceUsed(Image.fromarray(ref["image"]), ref.get("similarity"), ref.get("source"))
                        for ref in first.get("references") or []
                    ]
                    restorations = [
                        restorer.restore(
                            images[0],
                            prompt=first["prompt"],
                            references=references,
                            sampler=sampler,
                            options=options,
                            restoration_prompt=first["restoration_prompt"],
                            seed=first["seed"],
                            expert_weights=first["expert_weights"],
                            on_step=on_step,
                        )
                    ]
                else:
                    restorations = restorer.restore_batch(
                        images,
                        [payload["prompt"] for payload in payloads],
                        sampler,
                        options,
                        restoration_prompts=[payload["restoration_prompt"] for payload in payloads],
                        seeds=[payload["seed"] for payload in payloads],
                        expert_weights=first["expert_weights"],
                        on_step=on_step,
                    )
            except RestorationCancelled as err:
                self.cancelled += 1
                return [_error(CANCELLED, str(err))] * len(payloads)
            except InputError as err:
                return [_error(422, str(err))] * len(payloads)
            replica = self.replica()
            return [
                {
                    "image": np.asarray(restoration.image),
                    "caption": restoration.caption,
                    "restoration_prompt": restoration.restoration_prompt,
                    "seed": restoration.seed,
                    "model": model.describe(),
                    "seconds": restoration.seconds,
                    "batch": len(payloads),
                    "replica": replica,
                    "references": [{"source": ref.source, "similarity": ref.similarity} for ref in restoration.references],
                }
                for restoration in restorations
            ]

    return Restorer


class Captioner:
    """The preset's VLM (SUPIR's LLaVA; the tiny preset's small one), captioning stage-1 images."""

    def __init__(self, preset: str, num_gpus: float = 0.0, dtype: str = "auto"):
        from restoration.models.base import load_captioner
        from restoration.models.presets import load_preset
        from restoration.precision import resolve_dtype

        spec = load_preset(preset)
        device = _device(num_gpus)
        self.captioner = load_captioner(spec.captioner, spec.tokenizer, seed=spec.seed, dtype=resolve_dtype(dtype, device))
        self.captioner.model.to(device)
        self.worker = _Worker("caption")

    async def caption(self, image: np.ndarray) -> str:
        return await self.worker.run(self._caption, image)

    def _caption(self, image: np.ndarray) -> str:
        from PIL import Image

        from restoration.captioning import caption_images

        return caption_images(self.captioner, [Image.fromarray(image)])[0]


class Retriever:
    """The reference index and its store (CPU): the nearest references of a stage-1 image."""

    def __init__(self, index: str, app_config: dict):
        from restoration.retrieval.references import ReferenceIndex
        from runtime.resolve import resolve

        config = AppConfig.model_validate(app_config)
        self.index = ReferenceIndex.load(resolve(index, config.storage, config.mlflow))
        self.worker = _Worker("retrieve")

    async def query(self, image: np.ndarray, k: int) -> list[dict[str, Any]]:
        return await self.worker.run(self._query, image, k)

    def _query(self, image: np.ndarray, k: int) -> list[dict[str, Any]]:
        from PIL import Image

        found = self.index.query([Image.fromarray(image)], k)[0]
        return [
            {"id": ref.id, "source": ref.source, "similarity": ref.similarity, "image": np.asarray(ref.image.convert("RGB"))}
            for ref in found
        ]
