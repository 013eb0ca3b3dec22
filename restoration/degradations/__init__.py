"""Synthetic degradations: Real-ESRGAN second order, SPIRE parameterized, ABAIR composite/single, negative.

Everything here is numpy/opencv on HxWx3 uint8 RGB images, deterministic given a `numpy.random.Generator`, and
returns the ops it applied with their parameters (`DegradedSample`).
"""

from restoration.degradations.composite import CompositeConfig, composite_degrade, single_degrade
from restoration.degradations.negative import NegativeConfig, negative_degrade
from restoration.degradations.parameterized import ParameterizedConfig, parameterized_degrade
from restoration.degradations.realesrgan import RealESRGANConfig, realesrgan_degrade
from restoration.degradations.registry import REGISTRY, DegradationType, register
from restoration.degradations.sample import KINDS, DegradedSample

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
