"""SPIRE's parameterized degradation chain and the restoration prompt it writes.

Four ops, each applied independently with probability 0.5 in this order, as SPIRE skips them: Gaussian blur
(sigma, pixels), downsample (factor; the LQ is brought back to the HQ size with bicubic interpolation so every LQ
has the HQ's size), Gaussian noise (sigma on the [0, 1] scale), JPEG (quality). When every op is skipped the pair
is clean (LQ = HQ) with the blind prompt "Remove all degradation" (render of no ops): restoring it is the identity.

The downsample factor printed is the one applied: the small image's height is round(H / f), and the factor is
then H / that height (rounded to the prompt's precision, and the width follows from it).

Each parameter is rounded to the precision the prompt prints (`restoration.prompts.round_parameter`) *before*
it is applied, so "Deblur with sigma 2.0" means the blur applied had sigma exactly 2.0. With probability
`parameter_free_probability` the prompt leaves the numbers out ("Deblur; Denoise"), teaching the adaptor the
blind form of each instruction.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from restoration.degradations import ops
from restoration.degradations.sample import ChainConfig, DegradedSample
from restoration.prompts import PRECISION, PromptOp, render, round_parameter

OP_ORDER = ("blur", "downsample", "noise", "jpeg")


class ParameterizedConfig(ChainConfig):
    """SPIRE's chain. Ranges are drawn uniformly, then rounded to the prompt's precision."""

    op_probability: float = Field(0.5, gt=0, le=1, description="Chance that each op fires.")
    blur_sigma: tuple[float, float] = Field((0.5, 4.0), description="Gaussian blur sigma range (pixels).")
    downsample_factor: tuple[float, float] = Field((1.5, 4.0), description="Downsampling factor range.")
    noise_sigma: tuple[float, float] = Field((0.01, 0.2), description="Gaussian noise sigma range on the [0, 1] scale.")
    jpeg_quality: tuple[int, int] = Field((30, 95), description="JPEG quality range.")
    parameter_free_probability: float = Field(0.1, ge=0, le=1, description="Share of prompts written without numbers.")


def _draw(op: str, config: ParameterizedConfig, rng: np.random.Generator) -> float | int:
    if op == "jpeg":
        return int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
    low, high = {"blur": config.blur_sigma, "downsample": config.downsample_factor, "noise": config.noise_sigma}[op]
    value = round_parameter(op, float(rng.uniform(low, high)))
    # Rounding must not leave the configured range (0.004 -> 0.0 would apply no noise at all): clamp to the
    # printable values inside it.
    unit = 10 ** PRECISION[op]
    lowest, highest = math.ceil(low * unit - 1e-9) / unit, math.floor(high * unit + 1e-9) / unit
    return round_parameter(op, min(max(value, lowest), highest))


def downsampled_size(hq_shape: tuple[int, int], factor: float) -> tuple[int, int]:
    height, width = hq_shape
    return max(1, round(height / factor)), max(1, round(width / factor))


def exact_factor(hq_shape: tuple[int, int], factor: float) -> float:
    """The printable factor that the downsample to round(H / f) rows really applies (H / rows, rounded)."""
    rows = max(1, round(hq_shape[0] / factor))
    return round_parameter("downsample", hq_shape[0] / rows)


def apply_op(image: np.ndarray, op: str, value: float | int, rng: np.random.Generator, hq_shape: tuple[int, int]) -> np.ndarray:
    """Apply one parameterized op at exactly `value`."""
    if op == "blur":
        return ops.gaussian_blur(ops.as_float(image), float(value))
    if op == "downsample":
        height, width = hq_shape
        small_h, small_w = downsampled_size(hq_shape, float(value))
        small = ops.resize(ops.as_float(image), small_h, small_w, "bicubic")
        return ops.resize(small, height, width, "bicubic")
    if op == "noise":
        return ops.gaussian_noise(image, float(value), gray=False, rng=rng)
    if op == "jpeg":
        return ops.jpeg(image, int(value))
    raise ValueError(f"unknown parameterized op {op!r}; known: {', '.join(OP_ORDER)}")


def parameterized_degrade(hq: np.ndarray, rng: np.random.Generator, config: ParameterizedConfig | None = None) -> DegradedSample:
    config = config or ParameterizedConfig()
    chosen = [op for op in OP_ORDER if rng.random() < config.op_probability]  # each op skipped independently
    applied = [(op, _draw(op, config, rng)) for op in chosen]
    # The factor applied is what the rows allow; iterate once so the rows of the printed factor give it back.
    applied = [
        (op, exact_factor(hq.shape[:2], exact_factor(hq.shape[:2], value)) if op == "downsample" else value) for op, value in applied
    ]
    image: np.ndarray = hq
    for op, value in applied:
        image = apply_op(image, op, value, rng, hq.shape[:2])
    parameter_free = bool(rng.random() < config.parameter_free_probability)
    prompt_ops = [PromptOp(op, None if parameter_free else value) for op, value in applied]
    record = [{"op": op, "value": value} for op, value in applied]
    return DegradedSample(hq=hq, lq=ops.to_uint8(image), kind="parameterized", ops=record, restoration_prompt=render(prompt_ops))
