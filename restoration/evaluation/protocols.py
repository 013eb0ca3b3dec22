"""Evaluation protocols as data (`protocols/*.toml` in the package, `restoray list protocols`, or any TOML file the
user writes: `--protocol PATH`, validated the same way): how the test set is made from the data given (a seeded
degradation recipe applied to HQ images, paired LQ and HQ folders, or real LQ images scored without a reference),
the upscale the restoration runs with, and the metric convention (`metrics.CONVENTIONS`, border crop) it is scored in.

Paired protocols list their sets (`[[pairs]]`): each an LQ folder and an HQ folder under --data, matched by a key
taken from each file's stem (`lq_key`/`hq_key`: a regular expression whose group `key` is the key; the whole stem by
default), so the public layouts need no renaming: DIV2K's `0801x4.png` against `0801.png`, RealSR's `Canon_001_LR4`
and `Canon_001_HR` in one folder, Rain100L's `rain-001` against `norain-001`. A set with `noise_sigma` has no LQ
folder: its LQ is its HQ plus Gaussian noise of that sigma (0-255 scale), rounded down after clipping as PromptIR's
denoising test set makes it, seeded per case.

Each case's degradation is drawn from its own generator, seeded by (protocol seed, protocol name, the source's name
relative to the data, the case): the same test set on every run, whatever the number of workers. The HQ a case is
scored against is the original image (mod-cropped to the upscale), never a sharpened training target."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, model_validator

from restoration.config_model import StrictModel
from restoration.errors import InputError
from restoration.evaluation.conventions import ConventionName, MetricConvention
from restoration.seeding import numpy_generator

FULL_REFERENCE_KINDS = ("synthetic", "paired")

PROTOCOL_DIR = Path(__file__).with_name("protocols")


class ConventionSpec(StrictModel):
    convention: ConventionName = "refir"  # restoration.evaluation.metrics.CONVENTIONS
    crop_border: int = Field(0, ge=0)


class PairedSet(StrictModel):
    name: str = ""  # the cases' type (the protocol's name when empty) and, with several sets, their folder
    lq: str = "LQ"  # folders relative to --data
    hq: str = "HQ"
    lq_key: str = "(?P<key>.+)"  # matched against the whole stem (re.fullmatch); group `key` pairs LQ with HQ
    hq_key: str = "(?P<key>.+)"
    noise_sigma: float | None = Field(None, gt=0)  # instead of an LQ folder: HQ + N(0, sigma) on the 0-255 scale

    @model_validator(mode="after")
    def _keys_compile(self) -> PairedSet:
        for field in ("lq_key", "hq_key"):
            try:
                pattern = re.compile(getattr(self, field))
            except re.error as err:
                raise ValueError(f"{field}: not a regular expression ({err})") from None
            if "key" not in pattern.groupindex:
                raise ValueError(f"{field}: {pattern.pattern!r} has no group named key, e.g. (?P<key>.+)x4")
        return self

    def key(self, stem: str, side: Literal["lq", "hq"]) -> str | None:
        """The pairing key of a file stem, None when the stem does not match this side's pattern."""
        found = re.fullmatch(self.lq_key if side == "lq" else self.hq_key, stem)
        return found.group("key") if found else None

    def noisy(self, hq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        assert self.noise_sigma is not None
        return np.clip(hq + rng.standard_normal(hq.shape) * self.noise_sigma, 0, 255).astype(np.uint8)


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
    pairs: list[PairedSet] = Field(default_factory=lambda: [PairedSet()])  # kind "paired" only

    @model_validator(mode="after")
    def _distinct_sets(self) -> Protocol:
        names = [entry.name for entry in self.pairs]
        if len(names) != len(set(names)) or (len(names) > 1 and "" in names):
            raise ValueError(f"pairs: with several sets each needs its own name, got {names}")
        return self

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
        return MetricConvention(self.metrics.convention, self.metrics.crop_border)

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


def load_protocol(name_or_path: str) -> Protocol:
    """A packaged protocol by name, or a protocol file (a local path ending in .toml or naming a folder)."""
    is_file = name_or_path.endswith(".toml") or "/" in name_or_path or "\\" in name_or_path
    path = Path(name_or_path) if is_file else PROTOCOL_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROTOCOL_DIR.glob("*.toml")))
        if is_file:
            raise InputError(f"protocol file {name_or_path}: no such file")
        raise InputError(f"unknown protocol {name_or_path!r}; known: {known} (`restoray list protocols`), or a path to a .toml file")
    try:
        return Protocol.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, ValidationError) as err:
        raise InputError(f"protocol file {path}: {err}") from None
