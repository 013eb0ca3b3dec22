"""Sampler presets as data: one TOML file each in `presets/` (`[sampler]` holds SamplerConfig fields), chosen with
`restoray restore --sampler NAME`; every field stays overridable (`--set sampler.KEY=VALUE`, `--steps`, ...)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import ValidationError

from restoration.errors import InputError
from restoration.settings import SamplerConfig

SAMPLER_PRESET_DIR = Path(__file__).with_name("presets")


def list_sampler_presets() -> dict[str, str]:
    """name -> description of every packaged sampler preset."""
    return {path.stem: tomllib.loads(path.read_text(encoding="utf-8"))["description"] for path in sorted(SAMPLER_PRESET_DIR.glob("*.toml"))}


def sampler_preset(name: str) -> dict:
    """The preset's sampler fields (a dict, so a run's explicit settings can go on top)."""
    path = SAMPLER_PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise InputError(f"unknown sampler preset {name!r}; known: {', '.join(list_sampler_presets())}")
    fields = tomllib.loads(path.read_text(encoding="utf-8"))["sampler"]
    try:
        SamplerConfig.model_validate(fields)
    except ValidationError as err:
        raise InputError(f"sampler preset {path}: {err}") from None
    return fields


def with_sampler_preset(sampler: SamplerConfig, name: str | None) -> dict:
    """The sampler fields for a request or command naming preset `name`: the preset's fields over the defaults, with
    what `sampler` (a run's [sampler] section) set explicitly on top; `name` None: `sampler` as it is."""
    if name is None:
        return sampler.model_dump()
    explicit = sampler.model_dump(include=sampler.model_fields_set)
    return {**SamplerConfig().model_dump(), **sampler_preset(name), **explicit}
