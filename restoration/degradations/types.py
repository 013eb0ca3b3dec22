"""The built-in degradation types with their stable ids (see `registry`). Do not renumber: ids are in data.

| id | name       | severity                   | prompt                     |
|----|------------|----------------------------|----------------------------|
| 1  | noise      | sigma 0.02-0.20 ([0,1])    | Denoise with sigma 0.06    |
| 2  | blur       | sigma 0.5-3.5 px           | Deblur with sigma 2.0      |
| 3  | jpeg       | quality 10-40              | Dejpeg with quality 25     |
| 4  | downsample | factor 2.0-4.0             | Upsample to 3.0x           |
| 5  | rain       | streak density 0.2-1.0     | Derain                     |
| 6  | haze       | scattering beta 0.6-2.5    | Dehaze                     |
| 7  | low_light  | gamma 1.8-3.5              | Brighten                   |

SPIRE's four use the parameterized ops at the rounded value the prompt prints; rain, haze and low-light are
parameter-free in the prompt but still record every parameter they drew.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from restoration.degradations import ops
from restoration.degradations.parameterized import apply_op
from restoration.degradations.registry import DegradationType, register
from restoration.prompts import PromptOp, round_parameter

_PHRASES = {
    "noise": "Denoise with sigma <0.00>",
    "blur": "Deblur with sigma <0.0>",
    "jpeg": "Dejpeg with quality <q>",
    "downsample": "Upsample to <0.0>x",
}


def _parameterized_type(type_id: int, op: str, severity: tuple[float, float], description: str) -> DegradationType:
    def apply(image: np.ndarray, level: float, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        value = round_parameter(op, level)
        return apply_op(image, op, value, rng, image.shape[:2]), {"value": value}

    return DegradationType(type_id, op, severity, apply, lambda params: PromptOp(op, params["value"]), _PHRASES[op], description)


def _rain(image: np.ndarray, density: float, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Rain streaks: sparse drops smeared along a line kernel, screen-blended over the image."""
    image = ops.as_float(image)
    height, width = image.shape[:2]
    size_scale = max(height, width) / 512.0
    length = int(max(5, round(float(rng.uniform(10, 30)) * size_scale))) | 1
    angle = float(rng.uniform(-30, 30))
    brightness = float(rng.uniform(0.5, 0.9))
    drop_probability = 0.002 + 0.01 * density
    drops = (rng.random((height, width), dtype=np.float32) < drop_probability).astype(np.float32)
    kernel = np.zeros((length, length), np.float32)
    center = length // 2
    dx = math.sin(math.radians(angle)) * center
    dy = math.cos(math.radians(angle)) * center
    cv2.line(kernel, (round(center - dx), round(center - dy)), (round(center + dx), round(center + dy)), 1.0, 1, cv2.LINE_AA)
    streaks = cv2.filter2D(drops, -1, kernel / max(kernel.max(), 1e-6), borderType=cv2.BORDER_REFLECT_101)
    streaks = np.clip(cv2.GaussianBlur(streaks, (3, 3), 0) * brightness, 0, 1)[..., None]
    out = 1.0 - (1.0 - image) * (1.0 - streaks)
    return out, {"density": density, "length": length, "angle": angle, "brightness": brightness}


def _haze(image: np.ndarray, beta: float, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Atmospheric scattering I = J t + A (1 - t), t = exp(-beta d), with a smooth depth-like map d in [0, 1]."""
    image = ops.as_float(image)
    height, width = image.shape[:2]
    coarse = rng.random((4, 4)).astype(np.float32)
    depth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    # Farther towards the top, as in most outdoor photographs.
    depth = 0.5 * depth + 0.5 * np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None]
    depth = (depth - depth.min()) / max(float(depth.max() - depth.min()), 1e-6)
    airlight = float(rng.uniform(0.7, 1.0))
    transmission = np.exp(-beta * depth)[..., None]
    out = image * transmission + airlight * (1.0 - transmission)
    return out, {"beta": beta, "airlight": airlight}


def _low_light(image: np.ndarray, gamma: float, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Darkening by a gamma curve and an exposure factor, plus the sensor noise that comes with it."""
    image = ops.as_float(image)
    exposure = float(rng.uniform(0.5, 0.9))
    noise_sigma = float(rng.uniform(0.005, 0.03))
    dark = np.power(image, np.float32(gamma)) * np.float32(exposure)
    out = ops.gaussian_noise(dark, noise_sigma, gray=False, rng=rng)
    return out, {"gamma": gamma, "exposure": exposure, "noise_sigma": noise_sigma}


NOISE = register(_parameterized_type(1, "noise", (0.02, 0.2), "additive Gaussian noise"))
BLUR = register(_parameterized_type(2, "blur", (0.5, 3.5), "Gaussian blur"))
JPEG = register(_parameterized_type(3, "jpeg", (10, 40), "JPEG compression artifacts"))
DOWNSAMPLE = register(_parameterized_type(4, "downsample", (2.0, 4.0), "bicubic down- and upsampling"))
RAIN = register(DegradationType(5, "rain", (0.2, 1.0), _rain, lambda params: PromptOp("Derain"), "Derain", "rain streaks"))
HAZE = register(DegradationType(6, "haze", (0.6, 2.5), _haze, lambda params: PromptOp("Dehaze"), "Dehaze", "haze (atmospheric scattering)"))
LOW_LIGHT = register(
    DegradationType(7, "low_light", (1.8, 3.5), _low_light, lambda params: PromptOp("Brighten"), "Brighten", "low light with noise")
)
