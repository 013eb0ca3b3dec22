"""`restore-batch`'s model stage: a Ray Data actor holding one Restorer (and the index for references=auto) that
restores its batch, images of one working size together through `Restorer.restore_batch`, the others one by one."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
from PIL import Image

from pipelines.rows import image_of, is_rejected, reject, rows_of
from pipelines.timer import report
from restoration.errors import InputError
from restoration.images import encode_jpeg, encode_png

OUTPUT_COLUMNS = (
    "source", "output", "image", "width", "height", "caption", "references", "seed", "model", "seconds",
    "reject_stage", "reject_reason", "reject_detail",
)  # fmt: skip


def output_name(source: str, input_root: str, extension: str) -> str:
    """The output's path under images/, decided from the row alone (no listing of the corpus): the source's path
    relative to the input (folders), or `file__row=N` / `tar__key` (parquet, webdataset), with the output format's
    extension. Where that is not the source's own name (sanitising changed a character, the extension differs from
    the output's, a container member) a `~` and 10 hex digits of the source URI's SHA-256 go before the extension:
    photo.jpg and photo.png become photo~<h1>.png and photo.png, `a b.png` and `a_b.png` become a_b~<h2>.png and
    a_b.png. `~` is itself sanitised away, so a name that keeps its source's spelling never holds one and cannot meet
    a hashed name; two hashed names meet only when their sources' hashes do."""
    relative = source[len(input_root) :].lstrip("/") if source.startswith(input_root) else source.split("://", 1)[-1]
    container, _, inner = relative.partition("#")
    joined = f"{container}__{inner}" if inner else relative
    safe = "".join(char if char.isalnum() or char in "-_./" else "_" for char in joined).replace("..", "_")
    base = safe.rsplit("/", 1)[-1]
    stem, dot, suffix = safe.rpartition(".") if "." in base and not inner else (safe, "", "")
    if safe == relative and dot and suffix == extension:
        return f"{stem}.{extension}"
    return f"{stem}~{hashlib.sha256(source.encode()).hexdigest()[:10]}.{extension}"


class RestoreStage:
    """`weights` and `index` are URIs the driver pinned (runtime.resolve.pin): each actor resolves them into its own
    node's cache when it loads, since a path of the driver's cache does not exist on another node."""

    def __init__(
        self,
        weights: str,
        index: str | None,
        storage: dict,
        mlflow: dict,
        sampler: dict,
        options: dict,
        prompt: str | None,
        expert_weights,
        num_gpus: float,
        input_root: str,
        output_format: str,
        timer=None,
    ):
        self.weights, self.index_uri = weights, index
        self.storage, self.mlflow = storage, mlflow
        self.sampler, self.options = sampler, options
        self.prompt, self.expert_weights = prompt, expert_weights
        self.num_gpus, self.input_root, self.output_format = num_gpus, input_root, output_format
        self.timer = timer
        self.restorer = self.index = None

    def _load(self):
        if self.restorer is None:
            from restoration.precision import inference_device
            from restoration.restorer import Restorer
            from runtime.config import MlflowConfig, StorageConfig
            from runtime.resolve import on_this_node

            storage, mlflow = StorageConfig.model_validate(self.storage), MlflowConfig.model_validate(self.mlflow)
            self.restorer = Restorer.from_pretrained(
                on_this_node(self.weights, storage, mlflow),
                device=inference_device(self.num_gpus),
                dtype=self.options.get("dtype", "auto"),
                offload=self.options.get("offload", "none"),
            )
            if self.index_uri:
                from restoration.retrieval.references import ReferenceIndex

                self.index = ReferenceIndex.load(on_this_node(self.index_uri, storage, mlflow))
        return self.restorer

    def __call__(self, batch: dict) -> dict:
        from restoration.settings import RestoreConfig, SamplerConfig

        started = time.perf_counter()
        restorer = self._load()
        sampler, options = SamplerConfig.model_validate(self.sampler), RestoreConfig.model_validate(self.options)
        rows = rows_of(batch)
        live = [row for row in rows if not is_rejected(row)]
        groups: dict[object, list[dict]] = {}
        blended = restorer.experts and not isinstance(self.expert_weights or options.expert_weights, dict)
        for position, row in enumerate(live):
            alone = self.index is not None or blended
            key = ("alone", position) if alone else restorer.batch_key((int(row["width"]), int(row["height"])), options)
            groups.setdefault(key, []).append(row)
        for group in groups.values():
            images = [Image.fromarray(image_of(row)) for row in group]
            try:
                if len(group) == 1:
                    references = "auto" if self.index is not None else ()
                    results = [
                        restorer.restore(
                            images[0], self.prompt, references, sampler, options, index=self.index, expert_weights=self.expert_weights
                        )
                    ]
                else:
                    results = restorer.restore_batch(
                        images, [self.prompt] * len(group), sampler, options, expert_weights=self.expert_weights
                    )
            except InputError as err:
                for row in group:
                    reject(row, "restore", "restore_error", str(err))
                continue
            for row, result in zip(group, results, strict=True):
                pixels = np.asarray(result.image)
                row["image"] = encode_png(pixels) if self.output_format == "png" else encode_jpeg(pixels, 95)
                row["output"] = "images/" + output_name(row["source"], self.input_root, "png" if self.output_format == "png" else "jpg")
                row["width"], row["height"] = result.image.size
                row["caption"] = result.caption
                row["references"] = json.dumps([{"source": ref.source, "similarity": ref.similarity} for ref in result.references])
                row["seed"] = result.seed
                row["model"] = self.weights  # the pinned URI (or preset name), not this node's cache path
                row["seconds"] = json.dumps(result.seconds)
        if self.timer is not None:
            report(self.timer, "restore", len(live), time.perf_counter() - started)
        return {column: np.array([row.get(column) for row in rows] + [None], dtype=object)[:-1] for column in OUTPUT_COLUMNS}
