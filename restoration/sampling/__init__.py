"""Sampling: the restoration-guided EDM loop (tiling and colour fix come with the restorer).

The names load `edm` on first use (PEP 562) rather than at package import: see `restoration.degradations` for the
cross-thread import deadlock an `__init__` that imports its own submodules invites in a Ray worker.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["SamplerConfig", "StepInfo", "restoration_guided_sample", "schedule_sigmas", "step_sigmas"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.edm"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from restoration.sampling.edm import SamplerConfig, StepInfo, restoration_guided_sample, schedule_sigmas, step_sigmas
