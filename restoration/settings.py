"""Restoration settings as validated config models, light to import (no torch): the `[sampler]` and `[restore]`
sections of a run, what `Restorer.restore(sampler=..., options=...)` takes, what serving validates requests with."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from restoration.config_model import StrictModel
from restoration.prompts import BLIND_PROMPT

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Offload = Literal["none", "model", "all"]


class SamplerConfig(StrictModel):
    """Sampler settings: the `[sampler]` section of a run, `--set sampler.KEY=VALUE`, `Restorer.restore(sampler=...)`."""

    schedule: Literal["supir", "diffusers"] = Field(
        "supir",
        description="supir: SUPIR's RestoreEDMSampler step for step (legacy DDPM discretisation, sigma quantised to the "
        "training sigmas, CFG and control scale linear in sigma, k at the step's sigma); diffusers: diffusers' Euler on "
        "fractional timesteps (equal to EulerDiscreteScheduler without guidance), linear terms in the step index.",
    )
    steps: int = Field(50, ge=1, description="Number of Euler steps.")
    s_churn: float = Field(5.0, ge=0, description="EDM churn: stochasticity added per step (SUPIR's default 5).")
    s_noise: float = Field(1.003, gt=0, description="EDM noise scale of the churn.")
    s_tmin: float = Field(0.0, ge=0, description="Churn only at sigma >= s_tmin.")
    s_tmax: float = Field(math.inf, description="Churn only at sigma <= s_tmax.")
    cfg: float = Field(7.5, ge=1, description="Classifier-free guidance scale at the end (sigma 0 / the last step).")
    cfg_start: float | None = Field(
        4.0, ge=0, description="Guidance at sigma_max (supir) or the first step (diffusers): linear CFG; unset = cfg throughout."
    )
    tau_r: float | None = Field(
        4.0, description="Restoration-guidance exponent tau_r; 0 or less (SUPIR's s_stage1 = -1), or unset: no restoration guidance."
    )
    guidance_floor: float = Field(
        0.05, ge=0, description="Restoration guidance applies while the next sigma (supir) or sigma-hat (diffusers) is above this."
    )
    control_scale: float = Field(1.0, ge=0, description="Adaptor control scale at the last step.")
    control_scale_start: float | None = Field(None, ge=0, description="Control scale at the first step; unset = constant.")

    @field_validator("tau_r")
    @classmethod
    def _guidance_off_at_zero(cls, value: float | None) -> float | None:
        # SUPIR guides only when its restoration scale is above 0 (test.py's default -1 is "off"); TOML has no null,
        # so a preset says off with 0.
        if value is not None and not math.isfinite(value):
            raise ValueError(f"tau_r must be finite, got {value}")
        return value if value is not None and value > 0 else None


class RestoreConfig(StrictModel):
    """Restore defaults: the `[restore]` section of a run (`--set restore.KEY=VALUE`)."""

    restoration_prompt: str = Field(BLIND_PROMPT, description="SPIRE restoration prompt given to the adaptor.")
    seed: int = Field(0, description="Seed of the initial noise and the sampler's churn.")
    expert_weights: Literal["soft", "one_hot"] | dict[str, float] = Field(
        "soft", description="ABAIR expert blending: the estimator's 'soft' weights, its arg-max 'one_hot', or oracle weights by name."
    )
    upscale: float = Field(1.0, gt=0, description="Super-resolution factor: the output is the input's size times this (SUPIR's --upscale).")
    min_size: int | None = Field(
        None,
        ge=8,
        description="Restore at least at this short side (the LQ is upscaled bicubically first, as SUPIR does), then resize to "
        "the output size; unset: the preset's native size (8 x the UNet's sample size: 1024 for SDXL).",
    )
    gate_scale: float = Field(1.0, ge=0, description="ReFIR spatial-gate scale s (0: references are not used at all).")
    refir_cfg: Literal["paired", "shared"] = Field(
        "paired",
        description="ReFIR under CFG: 'paired' runs the references on both passes (upstream); 'shared' only on the conditional "
        "one, whose record the unconditional pass reuses (one reference pass per step instead of two).",
    )
    retrieval_k: int = Field(1, ge=1, description="References taken from the index with references='auto' (ReFIR uses one).")
    min_similarity: float = Field(
        0.8,
        ge=-1,
        le=1,
        description="Retrieved references below this cosine similarity are not used (unrelated references hurt, ReFIR "
        "shows); with none left the image is restored without a reference, and the result says so.",
    )
    reference_range: list[float] = Field(
        [0.0, 1.0],
        description="Part of the denoising [start, end] (0 = pure noise, 1 = done) in which ReFIR references are injected.",
    )
    tile_latent: int | None = Field(
        128,
        ge=8,
        description="Latents larger than this (128 = SDXL's 1024 px) are denoised in Gaussian-weighted tiles and decoded by the "
        "tiled VAE; images over 8x this are encoded tiled too. Unset: never tile.",
    )
    tile_overlap: int = Field(
        64, ge=0, description="Latent pixels of overlap between diffusion and VAE-decoder tiles (64: SUPIR's stride 64 on 128 tiles)."
    )
    tile_encoder_overlap: int = Field(64, ge=0, description="Pixels of overlap between VAE-encoder tiles.")
    dtype: Precision = Field(
        "auto",
        description="Precision the networks are held and run in (applied when a model is loaded: CLI, restore-batch, eval, "
        "serving replicas): auto = bf16 on CUDA, fp32 on CPU. The sampler's latents and sigmas, the colour fix and the "
        "estimator stay fp32; under fp16 the VAE and the robust encoder stay fp32 too (the SDXL VAE overflows in fp16).",
    )
    offload: Offload = Field(
        "none",
        description="model: keep the text encoders and the captioner in CPU memory and move each to the device only for its "
        "own phase (they run once per image), so the GPU holds the UNet, adaptor and VAE while sampling; all: every network "
        "so (the UNet and adaptor too: two host-device copies of them per image; the peak is the largest single phase, "
        "`restoray plan`); none: all stay on the device.",
    )

    @model_validator(mode="after")
    def _range(self) -> RestoreConfig:
        if len(self.reference_range) != 2 or not 0.0 <= self.reference_range[0] <= self.reference_range[1] <= 1.0:
            raise ValueError(f"reference_range must be [start, end] with 0 <= start <= end <= 1, got {self.reference_range}")
        return self
