"""ABAIR's synthetic samples: composite (CutMix regions of different types with a per-pixel mask) and single.

`composite_degrade` picks 2-4 distinct types, gives each a region (a rectangle or an irregular blob), degrades
the region's bounding box with that type and pastes the region in; later regions overwrite earlier ones. The
returned `mask` holds, per pixel, the id of the type that produced it (0 = clean), so it is the ground truth
of ABAIR's estimator. `single_degrade` applies one type to the whole image (mask all that id): what each LoRA
expert trains on.
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import Field

from restoration.degradations import ops
from restoration.degradations import types as _builtin_types  # noqa: F401  (registers the built-in types)
from restoration.degradations.registry import REGISTRY, DegradationRegistry, DegradationType
from restoration.degradations.sample import ChainConfig, DegradedSample
from restoration.prompts import BLIND_PROMPT, render

# Blur and downsampling read pixels around a region; degrading a slightly larger box keeps region edges honest.
_MARGIN = 16


class CompositeConfig(ChainConfig):
    regions: tuple[int, int] = Field((2, 4), description="Number of regions (each a different type).")
    region_size: tuple[float, float] = Field((0.25, 0.6), description="Region height/width as a share of the image's.")
    blob_probability: float = Field(0.5, ge=0, le=1, description="Chance that a region is an irregular blob, not a rectangle.")
    types: tuple[str, ...] | None = Field(
        ("rain", "haze", "noise", "blur", "low_light"),
        description="Type names composites mix: ABAIR's Phase I seen types by default (the others are held out as unseen "
        "tasks); unset = every registered type.",
    )


def _region(height: int, width: int, config: CompositeConfig, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    region_h = max(2, round(height * float(rng.uniform(*config.region_size))))
    region_w = max(2, round(width * float(rng.uniform(*config.region_size))))
    top = int(rng.integers(0, height - region_h + 1))
    left = int(rng.integers(0, width - region_w + 1))
    mask = np.zeros((height, width), bool)
    if rng.random() < config.blob_probability:
        field = cv2.resize(rng.random((6, 6)).astype(np.float32), (region_w, region_h), interpolation=cv2.INTER_CUBIC)
        # An ellipse-weighted random field, thresholded at its median: an irregular blob filling about half the box.
        yy, xx = np.mgrid[0:region_h, 0:region_w].astype(np.float32)
        ellipse = 1.0 - ((yy / max(region_h - 1, 1) - 0.5) ** 2 + (xx / max(region_w - 1, 1) - 0.5) ** 2) * 2.0
        score = field + ellipse
        mask[top : top + region_h, left : left + region_w] = score >= np.median(score)
        return mask, "blob"
    mask[top : top + region_h, left : left + region_w] = True
    return mask, "rectangle"


def _apply_in_box(hq: np.ndarray, region: np.ndarray, degradation: DegradationType, severity: float, rng: np.random.Generator):
    rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    top, bottom = max(0, rows[0] - _MARGIN), min(hq.shape[0], rows[-1] + 1 + _MARGIN)
    left, right = max(0, cols[0] - _MARGIN), min(hq.shape[1], cols[-1] + 1 + _MARGIN)
    degraded, params = degradation.apply(hq[top:bottom, left:right], severity, rng)
    return (top, bottom, left, right), ops.as_float(degraded), params


def composite_degrade(
    hq: np.ndarray, rng: np.random.Generator, config: CompositeConfig | None = None, registry: DegradationRegistry = REGISTRY
) -> DegradedSample:
    config = config or CompositeConfig()
    candidates = [registry.get(name) for name in config.types] if config.types else registry.all()
    low, high = config.regions
    count = min(int(rng.integers(low, high + 1)), len(candidates))
    chosen = [candidates[i] for i in rng.choice(len(candidates), size=count, replace=False)]
    height, width = hq.shape[:2]
    lq = ops.to_float(hq)
    mask = np.zeros((height, width), np.uint8)
    record = []
    for degradation in chosen:
        region, shape = _region(height, width, config, rng)
        severity = degradation.draw_severity(rng)
        (top, bottom, left, right), degraded, params = _apply_in_box(hq, region, degradation, severity, rng)
        box_region = region[top:bottom, left:right]
        lq[top:bottom, left:right][box_region] = degraded[box_region]
        mask[region] = degradation.id
        record.append(
            {"op": "region", "type": degradation.name, "id": degradation.id, "shape": shape, "severity": severity, "params": params}
        )
    for entry in record:
        entry["pixels"] = int(np.count_nonzero(mask == entry["id"]))  # after later regions painted over it
    return DegradedSample(hq=hq, lq=ops.to_uint8(lq), kind="composite", ops=record, restoration_prompt=BLIND_PROMPT, mask=mask)


def single_degrade(
    hq: np.ndarray,
    rng: np.random.Generator,
    degradation: str | int,
    severity: float | None = None,
    registry: DegradationRegistry = REGISTRY,
) -> DegradedSample:
    kind = registry.get(degradation)
    severity = kind.draw_severity(rng) if severity is None else float(severity)
    degraded, params = kind.apply(hq, severity, rng)
    mask = np.full(hq.shape[:2], kind.id, np.uint8)
    record = [{"op": kind.name, "id": kind.id, "severity": severity, "params": params}]
    return DegradedSample(
        hq=hq, lq=ops.to_uint8(degraded), kind="single", ops=record, restoration_prompt=render([kind.prompt(params)]), mask=mask
    )
