"""Degrade: K variants per accepted image, each of a kind drawn from the configured mix.

Each variant's generator is seeded from (run seed, source, variant), so a rebuild or a resumed build makes the
same samples. The output rows have DESIGN.md's sample schema; rejected rows pass through with their reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time

import numpy as np

from pipelines.config import DegradeConfig
from pipelines.rows import image_of, is_rejected, quality_of, rows_of
from pipelines.timer import report
from restoration.dataset import SAMPLE_COLUMNS
from restoration.degradations import (
    REGISTRY,
    composite_degrade,
    negative_degrade,
    parameterized_degrade,
    realesrgan_degrade,
    single_degrade,
)
from restoration.degradations.realesrgan import usm_source
from restoration.images import encode_jpeg, encode_mask_png, encode_png
from restoration.seeding import numpy_generator

# The source's CLIP embedding rides along for the sink's embeddings/ table (it is not a shard column).
# `variant` (0..K-1; null on rejects and generated negatives) lets the sink count sources exactly: one variant 0 each.
OUTPUT_COLUMNS = (*SAMPLE_COLUMNS, "variant", "embedding", "reject_stage", "reject_reason", "reject_detail")


def sample_id(content_sha256: str, source: str, variant: int) -> str:
    return hashlib.sha256(f"{content_sha256}\n{source}\n{variant}".encode()).hexdigest()[:32]


def _encode(image: np.ndarray, image_format: str) -> bytes:
    return encode_png(image) if image_format == "png" else encode_jpeg(image, 95)


def degrade_variant(hq: np.ndarray, kind: str, rng: np.random.Generator, config: DegradeConfig, sharpened=None):
    """One variant; `sharpened`: a callable giving the source's USM-sharpened HQ (computed once, shared by variants)."""
    if kind == "realesrgan":
        needs_usm = config.realesrgan.usm_lq_source or config.realesrgan.usm_target
        return realesrgan_degrade(hq, rng, config.realesrgan, sharpened() if needs_usm and sharpened else None)
    if kind == "parameterized":
        return parameterized_degrade(hq, rng, config.parameterized)
    if kind == "composite":
        return composite_degrade(hq, rng, config.composite)
    if kind == "single":
        types = REGISTRY.all()
        return single_degrade(hq, rng, types[int(rng.integers(len(types)))].id)
    return negative_degrade(hq, rng, config.degraded_negative)


class DegradeStage:
    """Batch UDF: work rows in, output rows out (K per accepted row, one per rejected row).

    A plain object with `__call__`: pass `stage.__call__` to map_batches so it runs as tasks, not as an actor
    pool holding a CPU (degradation has no model to keep loaded).
    """

    def __init__(self, config: DegradeConfig, seed: int, timer=None):
        self.config = config
        self.seed = seed
        self.timer = timer
        self.kinds = list(config.kinds)
        weights = np.array([config.kinds[k] for k in self.kinds], dtype=np.float64)
        self.weights = weights / weights.sum()

    def __call__(self, batch: dict) -> dict:
        started = time.perf_counter()
        out = []
        for row in rows_of(batch):
            if is_rejected(row):
                out.append({key: row.get(key) for key in ("source", "reject_stage", "reject_reason", "reject_detail")})
                continue
            hq = image_of(row)
            quality = quality_of(row)
            hq_bytes = _encode(hq, self.config.image_format)
            sharpened = functools.cache(functools.partial(usm_source, hq))  # once per source, only if a variant needs it
            for variant in range(self.config.variants):
                # Seeded by the image's content, not its URI: the same corpus built anywhere gives the same samples.
                rng = numpy_generator(self.seed, "degrade", quality.get("sha256", row["source"]), variant)
                kind = self.kinds[int(rng.choice(len(self.kinds), p=self.weights))]
                sample = degrade_variant(hq, kind, rng, self.config, sharpened)
                out.append(
                    {
                        "id": sample_id(quality.get("sha256", ""), row["source"], variant),
                        "source": row["source"],
                        "caption": row.get("caption") or "",
                        "alt_text": row.get("alt_text"),
                        # Negative samples train on a deliberately bad target, so theirs replaces the photo.
                        "hq": hq_bytes if sample.hq is hq else _encode(sample.hq, self.config.image_format),
                        "lq": _encode(sample.lq, self.config.image_format),
                        "height": int(hq.shape[0]),
                        "width": int(hq.shape[1]),
                        "kind": sample.kind,
                        "degradation": json.dumps(sample.ops),
                        "restoration_prompt": sample.restoration_prompt,
                        "mask": encode_mask_png(sample.mask) if sample.mask is not None else None,
                        "quality": row.get("quality"),
                        "variant": variant,
                        "embedding": row.get("embedding"),
                    }
                )
        if self.timer is not None:
            report(self.timer, "degrade", len(out), time.perf_counter() - started)
        return {column: np.array([row.get(column) for row in out] + [None], dtype=object)[:-1] for column in OUTPUT_COLUMNS}
