"""Synthetic degradations: Real-ESRGAN second order, SPIRE parameterized, ABAIR composite/single, negative.

Everything here is numpy/opencv on HxWx3 uint8 RGB images, deterministic given a `numpy.random.Generator`, and
returns the ops it applied with their parameters (`DegradedSample`).

The names below load their submodule on first use (PEP 562) rather than when the package is imported. A package
whose `__init__` imports its own submodules deadlocks against a second thread importing one of those submodules
directly (each holds the lock the other waits for); Python breaks the cycle by handing one thread the
half-initialised package, and a Ray worker (whose import thread unpickles functions while its main thread runs a
task) then fails with "cannot import name ... from partially initialized module". With nothing imported here,
the package lock is never held while a submodule lock is awaited.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> submodule that defines it (REGISTRY loads the built-in types on its first use: registry.load_plugins).
_WHERE = {
    "CompositeConfig": "composite",
    "composite_degrade": "composite",
    "single_degrade": "composite",
    "NegativeConfig": "negative",
    "negative_degrade": "negative",
    "ParameterizedConfig": "parameterized",
    "parameterized_degrade": "parameterized",
    "RealESRGANConfig": "realesrgan",
    "realesrgan_degrade": "realesrgan",
    "REGISTRY": "registry",
    "DegradationType": "registry",
    "register": "registry",
    "KINDS": "sample",
    "DegradedSample": "sample",
}

__all__ = [
    "KINDS",
    "REGISTRY",
    "CompositeConfig",
    "DegradationType",
    "DegradedSample",
    "NegativeConfig",
    "ParameterizedConfig",
    "RealESRGANConfig",
    "composite_degrade",
    "negative_degrade",
    "parameterized_degrade",
    "realesrgan_degrade",
    "register",
    "single_degrade",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:
    from restoration.degradations.composite import CompositeConfig, composite_degrade, single_degrade
    from restoration.degradations.negative import NegativeConfig, negative_degrade
    from restoration.degradations.parameterized import ParameterizedConfig, parameterized_degrade
    from restoration.degradations.realesrgan import RealESRGANConfig, realesrgan_degrade
    from restoration.degradations.registry import REGISTRY, DegradationType, register
    from restoration.degradations.sample import KINDS, DegradedSample
