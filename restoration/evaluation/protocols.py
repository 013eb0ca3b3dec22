"""Evaluation protocols as packaged data (`protocols/*.toml`, `restoray list protocols`): how the test set is made
from the data given (a seeded degradation recipe applied to HQ images, paired LQ/ + HQ/ folders, or real LQ images
scored without a reference), the upscale
the restoration runs with, and the metric convention (colour space, border crop) it is scored in.

Each case's degradation is drawn from its own generator, seeded by (protocol seed, protocol name, the source's name
relative to the data, the case): the same test set on every run, whatever the number of workers. The HQ a case is
scored against is the original image (mod-cropped to the upscale), never a sharpened training target."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, model_validator

from restoration.config_model import StrictModel
from restoration.errors import InputError
from restoration.evaluation.metrics import MetricConvention
from restoration.seeding import numpy_generator

FULL_REFERENCE_KINDS = ("synthetic", "paired")

PROTOCOL_DIR = Path(__file__).with_name("protocols")


class ConventionSpec(StrictModel):
    color_space: Literal["rgb", "y"] = "y"
    crop_border: int = Field(0, ge=0)


class Protocol(StrictModel):
    name: str
    description: str
    kind: Literal["synthetic", "paired", "no_reference"]
    recipe: Literal["realesrgan", "parameterized", "single"] | None = None
    recipe_config: dict[str, Any] = Field(default_factory=dict)
    # recipe "single": one case per entry, a degradation type or several joined by "+" (applied in turn, whole image)
    types: list[str] | None = None
    seed: int = 0
    upscale: float = Field(1.0, gt=0)
    metrics: ConventionSpec = Field(default_factory=ConventionSpec)

    @model_validator(mode="after")
    def _known_types(self) -> Protocol:
        from restoration.degradations import REGISTRY

        known = {kind.name for kind in REGISTRY.all()}
        unknown = sorted({part for case in self.types or [] for part in case.split("+")} - known)
        if unknown:
            raise ValueError(f"types: unknown degradations {unknown}; known: {sorted(known)}")
        return self

    @property
    def has_reference(self) -> bool:
        return self.kind in FULL_REFERENCE_KINDS

    @property
    def convention(self) -> MetricConvention:
        return MetricConvention(self.metrics.color_space, self.metrics.crop_border)

    def cases(self) -> list[str]:
        """The case names of one source ("" when a source is one case)."""
        return list(self.types) if self.recipe == "single" and self.types else [""]

    def degrade(self, hq: np.ndarray, source_name: str, case: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """(the HQ scored against: mod-cropped to the upscale, the LQ, the ops applied) for one case of a source."""
        from restoration.degradations import (
            ParameterizedConfig,
            RealESRGANConfig,
            parameterized_degrade,
            realesrgan_degrade,
            single_degrade,
        )

        scale = max(1, round(self.upscale))
        height, width = (hq.shape[0] // scale) * scale, (hq.shape[1] // scale) * scale
        if height == 0 or width == 0:
            raise InputError(f"{source_name}: {hq.shape[1]}x{hq.shape[0]} is smaller than the protocol's scale {scale}")
        hq = np.ascontiguousarray(hq[:height, :width])
        rng = numpy_generator(self.seed, self.name, source_name, case)
        if self.recipe == "realesrgan":
            sample = realesrgan_degrade(hq, rng, RealESRGANConfig.model_validate(self.recipe_config))
        elif self.recipe == "parameterized":
            sample = parameterized_degrade(hq, rng, ParameterizedConfig.model_validate(self.recipe_config))
        elif self.recipe == "single":
            lq, applied = hq, []
            for name in case.split("+"):
                sample = single_degrade(lq, rng, name)
                lq, applied = sample.lq, applied + sample.ops
            return hq, lq, applied
        else:
            raise InputError(f"protocol {self.name} ({self.kind}) has no degradation recipe")
        return hq, sample.lq, sample.ops


def list_protocols() -> dict[str, str]:
    return {path.stem: load_protocol(path.stem).description for path in sorted(PROTOCOL_DIR.glob("*.toml"))}


def load_protocol(name: str) -> Protocol:
    path = PROTOCOL_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROTOCOL_DIR.glob("*.toml")))
        raise InputError(f"unknown protocol {name!r}; known: {known} (`restoray list protocols`)")
    try:
        return Protocol.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, ValidationError) as err:
        raise InputError(f"protocol file {path}: {err}") from None
