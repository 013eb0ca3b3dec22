"""Synthetic degradations: Real-ESRGAN second order, SPIRE parameterized, ABAIR composite/single, negative.

Everything here is numpy/opencv on HxWx3 uint8 RGB images, deterministic given a `numpy.random.Generator`, and
returns the ops it applied with their parameters.
"""

from restoration.degradations.realesrgan import RealESRGANConfig, realesrgan_degrade
from restoration.degradations.sample import KINDS, DegradedSample

__all__ = ["KINDS", "DegradedSample", "RealESRGANConfig", "realesrgan_degrade"]
