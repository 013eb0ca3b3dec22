"""What every degradation chain returns, and the config base shared by the chain configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

KINDS = ("realesrgan", "parameterized", "composite", "single", "negative")


class ChainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _ordered_ranges(self):
        for name, value in self:
            if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value) and value[0] > value[1]:
                raise ValueError(f"{name}: range {value} has its low end above its high end")
        return self


@dataclass
class DegradedSample:
    """One training pair. Images are HxWx3 uint8 RGB; `mask` is HxW uint8 of degradation type ids (0 = clean)."""

    hq: np.ndarray
    lq: np.ndarray
    kind: str
    ops: list[dict[str, Any]] = field(default_factory=list)
    restoration_prompt: str = ""
    mask: np.ndarray | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown sample kind {self.kind!r}; known: {', '.join(KINDS)}")
