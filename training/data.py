"""The training feed: the parquet shards of `restoray data build`, streamed by Ray Data to the Train workers.

`training_dataset` reads the shards (local or s3://), keeps the rows the stage trains on, and decodes and crops
them in Ray Data tasks (CPU, beside the trainers), so the workers receive ready uint8 crops through
`ray.train.get_dataset_shard("train")`. `check_shards` runs on the driver before any worker starts: it names
missing columns and an empty selection (e.g. no `single` rows of the expert's type) instead of letting a worker
wait for batches that never come.

Which rows a stage reads: adaptor all kinds (`negative` and `degraded_negative` with the negative-quality prompt);
encoder all but those two (their targets are deliberately bad); experts `single` rows of `train.expert`; estimator `composite` and
`single` (they carry masks).
"""

from __future__ import annotations

import hashlib
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from restoration.dataset import TRAINING_COLUMNS
from restoration.degradations import parameterized_degrade, realesrgan_degrade
from restoration.degradations.sample import NEGATIVE_KINDS
from restoration.errors import InputError
from restoration.images import ImageDecodeError, decode_image
from restoration.seeding import numpy_generator
from runtime.config import StorageConfig
from runtime.storage import arrow_filesystem, read_bytes
from training.config import TrainConfig


def shards_path(uri: str) -> str:
    """A dataset directory (with shards/ inside) or the shards directory itself."""
    uri = uri.rstrip("/")
    return uri if uri.endswith("/shards") or uri.endswith(".parquet") else f"{uri}/shards"


def stage_filter(config: TrainConfig) -> pc.Expression | None:
    kind = pc.field("kind")
    if config.stage == "encoder":
        return ~kind.isin(list(NEGATIVE_KINDS))
    if config.stage == "estimator":
        return kind.isin(["composite", "single"])
    if config.stage == "experts":
        # `degradation` of a single sample: [{"op": <type name>, "id": ..., ...}]
        return (kind == "single") & pc.starts_with(pc.field("degradation"), f'[{{"op": "{config.expert}"')
    return None


def check_shards(config: TrainConfig, storage: StorageConfig, min_rows: int) -> dict[str, Any]:
    """Driver-side check of the dataset: the columns exist and the stage's selection has enough rows."""
    if not config.data:
        raise InputError("train.data is not set: point it at the output of `restoray data build` (--set train.data=PATH)")
    path = shards_path(config.data)
    filesystem, local_path = arrow_filesystem(path, storage)
    try:
        dataset = pads.dataset(local_path, format="parquet", filesystem=filesystem)
        missing = [column for column in TRAINING_COLUMNS if column not in dataset.schema.names]
    except (OSError, ValueError) as err:
        raise InputError(f"train.data {config.data!r}: no readable parquet shards at {path} ({err})") from err
    if not dataset.files:
        raise InputError(f"train.data {config.data!r}: no parquet shards at {path}")
    if missing:
        raise InputError(f"train.data {config.data!r}: shards lack the columns {missing} (written by an older or other tool?)")
    selected = dataset.count_rows(filter=stage_filter(config))
    kinds = dataset.to_table(columns=["kind"]).column("kind").value_counts().to_pylist()
    if selected < min_rows:
        what = {"experts": f"`single` rows of type {config.expert!r}", "estimator": "`composite` or `single` rows"}
        present = ", ".join(f"{item['values']}={item['counts']}" for item in kinds)
        raise InputError(
            f"train.data {config.data!r}: stage {config.stage!r} needs at least {min_rows} {what.get(config.stage, 'rows')} "
            f"(one micro-batch per worker), found {selected}; kinds present: {present}"
        )
    return {"path": path, "rows": selected, "files": len(dataset.files)}


def manifest_id(config: TrainConfig, storage: StorageConfig) -> str | None:
    """A short content hash of the dataset's manifest.json (None when the dataset has none)."""
    root = shards_path(config.data).removesuffix("/shards")
    try:
        return hashlib.sha256(read_bytes(f"{root}/manifest.json", storage)).hexdigest()[:16]
    except FileNotFoundError:
        return None


def _decode_mask(data: bytes | None, shape: tuple[int, int]) -> np.ndarray:
    if data is None:
        return np.zeros(shape, np.uint8)
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ImageDecodeError("not_image", "mask is not a PNG")
    return mask if mask.shape == shape else cv2.resize(mask, shape[::-1], interpolation=cv2.INTER_NEAREST)


class DecodeCounter:
    """Rows read and rows that did not decode, over every task of the training feed (a Ray actor: `new_decode_counter`)."""

    def __init__(self):
        self.rows, self.failed = 0, 0

    def add(self, rows: int, failed: int) -> tuple[int, int]:
        self.rows += rows
        self.failed += failed
        return self.rows, self.failed

    def totals(self) -> tuple[int, int]:
        return self.rows, self.failed


def new_decode_counter():
    import ray

    from runtime.resources import on_the_drivers_node

    return ray.remote(num_cpus=0)(DecodeCounter).options(**on_the_drivers_node()).remote()


class TooManyDecodeFailures(RuntimeError):
    pass


class PrepareRows:
    """Ray Data batch UDF: decode HQ/LQ/mask, one random square crop at the training size (the same window in all
    three), optionally a fresh degradation. Rows whose bytes do not decode are dropped with a warning and counted
    (`DecodeCounter`; the run logs the totals to MLflow); over `train.max_decode_failure_share` the run fails (the
    dataset build validated them: many failures mean the shards were damaged since)."""

    def __init__(self, config: TrainConfig, seed: int, counter=None):
        self.resolution = config.resolution
        self.degrade_on_the_fly = config.degrade_on_the_fly
        self.seed = seed
        self.expression = stage_filter(config)
        self.counter = counter
        self.max_share, self.min_rows = config.max_decode_failure_share, config.decode_failure_min_rows

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        if self.expression is not None:
            table = table.filter(self.expression)
        batch = {name: table.column(name).to_pylist() for name in TRAINING_COLUMNS}
        out: dict[str, list] = {key: [] for key in ("hq", "lq", "mask", "caption", "restoration_prompt", "kind")}
        failed = 0
        for index, row_id in enumerate(batch["id"]):
            # Seeded by the row's content (its HQ and LQ bytes), not a per-process counter or its URI-derived id: the
            # same sample gets the same crop in any task, process, run or directory (the golden loss curve).
            content = hashlib.sha256(batch["hq"][index] or b"").hexdigest() + hashlib.sha256(batch["lq"][index] or b"").hexdigest()
            rng = numpy_generator(self.seed, "train-crop", content)
            try:
                hq = decode_image(batch["hq"][index])
                lq = decode_image(batch["lq"][index])
                mask = _decode_mask(batch["mask"][index], hq.shape[:2])
            except ImageDecodeError as err:
                import logging

                logging.getLogger(__name__).warning("skipping row %s: %s", row_id, err)
                failed += 1
                continue
            if lq.shape != hq.shape:  # LQ stored at its own size: bring it onto the HQ grid, as SUPIR does
                lq = cv2.resize(lq, hq.shape[1::-1], interpolation=cv2.INTER_CUBIC)
            hq, lq, mask = self._crop(hq, lq, mask, rng)
            kind, prompt = str(batch["kind"][index]), batch["restoration_prompt"][index] or ""
            if self.degrade_on_the_fly and kind in ("realesrgan", "parameterized"):
                sample = realesrgan_degrade(hq, rng) if kind == "realesrgan" else parameterized_degrade(hq, rng)
                lq, prompt = sample.lq, sample.restoration_prompt
                if lq.shape != hq.shape:
                    lq = cv2.resize(lq, hq.shape[1::-1], interpolation=cv2.INTER_CUBIC)
            out["hq"].append(hq)
            out["lq"].append(lq)
            out["mask"].append(mask)
            out["caption"].append(batch["caption"][index] or "")
            out["restoration_prompt"].append(prompt)
            out["kind"].append(kind)
        self._count(len(batch["id"]), failed)
        size = self.resolution
        return {
            "hq": np.stack(out["hq"]) if out["hq"] else np.zeros((0, size, size, 3), np.uint8),
            "lq": np.stack(out["lq"]) if out["lq"] else np.zeros((0, size, size, 3), np.uint8),
            "mask": np.stack(out["mask"]) if out["mask"] else np.zeros((0, size, size), np.uint8),
            "caption": np.array(out["caption"], dtype=object),
            "restoration_prompt": np.array(out["restoration_prompt"], dtype=object),
            "kind": np.array(out["kind"], dtype=object),
        }

    def _count(self, rows: int, failed: int) -> None:
        if self.counter is None:
            return
        import ray

        total, total_failed = ray.get(self.counter.add.remote(rows, failed))
        if total >= self.min_rows and total_failed > self.max_share * total:
            raise TooManyDecodeFailures(
                f"{total_failed} of {total} training rows did not decode, more than train.max_decode_failure_share = "
                f"{self.max_share:g}: the shards are damaged; rebuild them with `restoray data build`"
            )

    def _crop(self, hq: np.ndarray, lq: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        size = self.resolution
        height, width = hq.shape[:2]
        if min(height, width) < size:  # too small for the crop: upscale so the short side fits
            scale = size / min(height, width)
            new = (max(size, round(width * scale)), max(size, round(height * scale)))
            hq = cv2.resize(hq, new, interpolation=cv2.INTER_CUBIC)
            lq = cv2.resize(lq, new, interpolation=cv2.INTER_CUBIC)
            mask = cv2.resize(mask, new, interpolation=cv2.INTER_NEAREST)
            height, width = hq.shape[:2]
        top, left = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
        window = (slice(top, top + size), slice(left, left + size))
        return hq[window], lq[window], mask[window]


def training_dataset(config: TrainConfig, seed: int, storage: StorageConfig, counter=None):
    """The Ray Dataset of prepared crops for this stage (lazy: it streams when the workers iterate)."""
    import ray

    path = shards_path(config.data)
    filesystem, local_path = arrow_filesystem(path, storage)
    cpus = config.data_cpus
    dataset = ray.data.read_parquet(local_path, filesystem=filesystem, columns=list(TRAINING_COLUMNS), num_cpus=cpus)
    # A bound method, so that Ray Data runs it as tasks (a callable class would hold an actor pool's CPUs).
    return dataset.map_batches(PrepareRows(config, seed, counter).__call__, batch_size=16, batch_format="pyarrow", num_cpus=cpus)
