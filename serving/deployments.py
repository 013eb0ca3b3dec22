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
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from restoration.errors import InputError, RestorationCancelled
from serving.config import AppConfig

log = logging.getLogger("ray.serve.restoray")  # under Serve's logger: its files, its request ids
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
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


class FreeSlotBatcher:
    """Batches formed when the model thread is free: a request that arrives while a batch runs waits for the next one,
    which takes up to `max_batch_size` of the queued requests for one model (the oldest request's), so a lone request
    never waits and a busy replica runs full batches. `wait_s` > 0 lets a batch that is not full wait that long for more.

    Not Serve's `@serve.batch`: its loop forms the next batch as soon as the current one starts, so with a short wait
    every request under load became a batch of one queued behind the running one (bench/serving.py measured a mean
    batch of 1.1 under 16 clients with max_batch_size 4)."""

    def __init__(self, run, max_batch_size: int, wait_s: float = 0.0):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.queue: list[tuple[str, Any, asyncio.Future]] = []
        self.drainer: asyncio.Task | None = None

    async def submit(self, key: str, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((key, item, future))
        if self.drainer is None or self.drainer.done():
            self.drainer = asyncio.create_task(self._drain())
        return await future  # a cancelled caller cancels only its future: the batch skips it

    async def _drain(self) -> None:
        while self.queue:
            if self.wait_s and len(self.queue) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)
            key = self.queue[0][0]
            taken = [entry for entry in self.queue if entry[0] == key][: self.max_batch_size]
            taken_ids = {id(entry) for entry in taken}
            self.queue = [entry for entry in self.queue if id(entry) not in taken_ids]
            live = [entry for entry in taken if not entry[2].done()]
            if not live:
                continue
            try:
                results = await self.run([item for _, item, _ in live])
            except Exception as err:  # every caller of the batch gets the error; the next batch still runs
                for _, _, future in live:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, _, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)


def app_name() -> str:
    """The Serve application this replica belongs to (boards and metrics are per application)."""
    return serve.get_replica_context().app_name


def restorer_deployment(config: AppConfig):
    """The Restorer deployment class, its LRU size and batch size taken from `config` (decorator arguments)."""
    serve_config = config.serve

    class Restorer:
        def __init__(self, app_config: dict):
            from serving.jobs import ProgressReporter, job_board
            from serving.metrics import RestorerMetrics
            from serving.models import ModelStore

            self.config = AppConfig.model_validate(app_config)
            self.device = _device(self.config.serve.restorer.num_gpus)
            self.store = ModelStore(self.config, self.device)
            # The default model loads here, before Serve routes anything to this replica: a new (autoscaled)
            # replica is ready when it takes traffic. Pinned: the LRU never has to load it again.
            default = self.store.catalog.resolve(None)
            self.pinned = {default.model_id: self.store.load(default.model_id)}
            self.worker = _Worker("restore")
            self.loaded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # what Serve's LRU still holds
            self.loaded[default.model_id] = self.pinned[default.model_id]
            self.cancelled = 0  # restorations stopped by a cancel flag (a job's, or a disconnected client's)
            board = job_board(app_name(), self.config.serve, self.config.storage)
            self.progress = ProgressReporter(board, self.config.serve.progress_every_s)
            self.metrics = RestorerMetrics()
            self.batcher = FreeSlotBatcher(self._run_batch, self.config.serve.max_batch_size, self.config.serve.batch_wait_timeout_s)

        def check_health(self) -> None:
            """Serve's health check: answered on the replica's event loop, never behind the model thread (a replica
            busy with a long restore is healthy)."""
            if self.worker.closed:
                raise RuntimeError("the model thread pool was shut down")

        @serve.multiplexed(max_num_models_per_replica=serve_config.models_per_replica)
        async def get_model(self, model_id: str):
            if model_id in self.pinned:
                return self.pinned[model_id]
            model = await self.worker.run(self.store.load, model_id)  # on the replica's device, in restore.dtype
            self.loaded[model_id] = model
            return model

        async def _model(self, model_id: str):
            try:
                return await self.get_model(model_id), None
            except InputError as err:
                return None, _error(422, f"model: {err}")

        async def models(self) -> dict[str, Any]:
            return self.replica()

        async def job_steps(self, job_id: str) -> int | None:
            """The steps this replica's sampler ran for a job (tests ask it after a cancel)."""
            return self.progress.steps_run.get(job_id)

        def replica(self) -> dict[str, Any]:
            loaded = list(self.loaded.values())
            return {
                "models": sorted({model.name: model.version for model in loaded}.items()),
                # Distinct SDXL UNets among the loaded versions: one per preset when they share the base.
                "sdxl_bases": len({id(model.restorer.networks.unet) for model in loaded}),
                "cancelled": self.cancelled,
            }

        async def stage1(self, call) -> dict[str, Any]:
            """SUPIR's stage 1 at the working size `restore` will use: the image the Captioner and Retriever see."""
            model, error = await self._model(call.model.model_id)
            if error:
                return error
            return await self.worker.run(self._stage1, model.restorer, call.image, call.options)

        @staticmethod
        def _stage1(restorer, image: np.ndarray, options) -> dict[str, Any]:
            from PIL import Image

            picture = Image.fromarray(image)
            output = (max(1, round(picture.width * options.upscale)), max(1, round(picture.height * options.upscale)))
            stage = restorer.stage1(restorer.working_image(picture, output, options), options)
            return {"image": np.asarray(stage.image)}

        async def restore(self, call) -> dict[str, Any]:
            """One request (a RestoreCall); alone when it has references, else through the batch. A cancelled call
            (the client went away, Serve cancels this coroutine) sets the request's flag, which the sampler reads at
            its next step; a job's flag is also set when the board says the job is over."""
            flag = threading.Event()
            if call.job_id is not None:
                self.progress.follow(call.job_id, flag)
            try:
                if call.references:
                    model, error = await self._model(call.model.model_id)
                    return error or (await self.worker.run(self._restore_group, model, [(call, flag)]))[0]
                return await self.batcher.submit(call.model.model_id, (call, flag))
            except asyncio.CancelledError:
                flag.set()
                raise
            finally:
                if call.job_id is not None:
                    self.progress.unfollow(call.job_id)

        async def _run_batch(self, items: list[tuple[Any, threading.Event]]) -> list[dict[str, Any]]:
            # The batcher takes one model's requests per batch.
            model, error = await self._model(items[0][0].model.model_id)
            if error:
                return [error] * len(items)
            self.metrics.batch(len(items))
            groups: dict[Any, list[int]] = {}
            for position, (call, _) in enumerate(items):
                groups.setdefault(self._group_key(model.restorer, call, position), []).append(position)
            results: list[dict[str, Any] | None] = [None] * len(items)
            for positions in groups.values():
                replies = await self.worker.run(self._restore_group, model, [items[p] for p in positions])
                for position, reply in zip(positions, replies, strict=True):
                    results[position] = reply
            return results

        @staticmethod
        def _group_key(restorer, call, position: int):
            """Requests that can share one forward pass: one working size, sampler, options (but seed and restoration
            prompt, which are per sample) and expert weights. With experts blended by the estimator the weights depend
            on the image, so such a request runs alone."""
            experts = call.expert_weights or call.options.expert_weights
            if restorer.experts and not isinstance(experts, dict):
                return ("alone", position)
            height, width = call.image.shape[:2]
            shared = call.options.model_dump(exclude={"seed", "restoration_prompt"})
            return (
                restorer.batch_key((width, height), call.options),
                json.dumps(call.sampler.model_dump(), sort_keys=True),
                json.dumps(shared, sort_keys=True),
                json.dumps(experts, sort_keys=True),
            )

        def _restore_group(self, model, items: list[tuple[Any, threading.Event]]) -> list[dict[str, Any]]:
            from PIL import Image

            from restoration.restorer import ReferenceUsed

            restorer = model.restorer
            calls = [call for call, _ in items]
            flags = [flag for _, flag in items]
            first = calls[0]
            images = [Image.fromarray(call.image) for call in calls]
            started = time.monotonic()

            def on_step(info) -> None:
                for call in calls:
                    if call.job_id is not None:
                        self.progress.step(call.job_id, info.index + 1, info.steps)
                if all(flag.is_set() for flag in flags):
                    info.cancel()

            try:
                if len(calls) == 1:
                    references = [ReferenceUsed(Image.fromarray(ref.image), ref.similarity, ref.source) for ref in first.references or []]
                    restorations = [
                        restorer.restore(
                            images[0],
                            prompt=first.prompt,
                            references=references,
                            sampler=first.sampler,
                            options=first.options,
                            restoration_prompt=first.restoration_prompt,
                            seed=first.options.seed,
                            expert_weights=first.expert_weights,
                            on_step=on_step,
                        )
                    ]
                else:
                    restorations = restorer.restore_batch(
                        images,
                        [call.prompt for call in calls],
                        first.sampler,
                        first.options,
                        restoration_prompts=[call.restoration_prompt for call in calls],
                        seeds=[call.options.seed for call in calls],
                        expert_weights=first.expert_weights,
                        on_step=on_step,
                    )
            except RestorationCancelled as err:
                self.cancelled += 1
                return [_error(CANCELLED, str(err))] * len(calls)
            except InputError as err:
                return [_error(422, str(err))] * len(calls)
            seconds = time.monotonic() - started
            self.metrics.restored(model.name, seconds, first.sampler.steps / max(seconds, 1e-9))
            return [
                {
                    "image": np.asarray(restoration.image),
                    "caption": restoration.caption,
                    "restoration_prompt": restoration.restoration_prompt,
                    "seed": restoration.seed,
                    "model": model.describe(),
                    "seconds": restoration.seconds,
                    "batch": len(calls),
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

        from serving.codec import thumbnail

        found = self.index.query([Image.fromarray(image)], k)[0]
        images = [np.asarray(ref.image.convert("RGB")) for ref in found]
        # Answers name a reference by its file name: its full URI would show clients the reference store's layout.
        return [
            {
                "id": ref.id,
                "source": ref.source.rsplit("/", 1)[-1],
                "similarity": ref.similarity,
                "image": pixels,
                "thumbnail": thumbnail(pixels),
            }
            for ref, pixels in zip(found, images, strict=True)
        ]
