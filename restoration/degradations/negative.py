"""SUPIR's negative-quality samples: a deliberately low-quality *target*, trained with the negative-quality prompt.

SUPIR adds such samples so that classifier-free guidance has something concrete to steer away from: the model
learns what "oil painting, blurring, dirty, messy, worst quality, low quality, jpeg artifacts, over-smooth"
looks like when the negative prompt asks for it. The target here is the HQ photo smeared (blur, down- and
upsampling), oversharpened with halos, colour-shifted, noisy and heavily JPEG-compressed; the LQ is made from
that target like a Real-ESRGAN LQ (at 1/scale or resized back), and the restoration prompt is empty.
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import Field

from restoration.degradations import ops
from restoration.degradations.sample import ChainConfig, DegradedSample


class NegativeConfig(ChainConfig):
    blur_sigma: tuple[float, float] = Field((1.5, 4.0), description="Blur sigma range (pixels).")
    downsample_factor: tuple[float, float] = Field((2.0, 4.0), description="Down-and-up factor range.")
    oversharpen: tuple[float, float] = Field((1.0, 3.0), description="Unsharp amount range (halos).")
    saturation: tuple[float, float] = Field((0.3, 1.8), description="Saturation factor range (washed out to garish).")
    noise_sigma: tuple[float, float] = Field((0.02, 0.08), description="Gaussian noise sigma range on [0, 1].")
    jpeg_quality: tuple[int, int] = Field((5, 25), description="JPEG quality range.")
    scale: int = Field(4, ge=1, le=8, description="HQ/LQ size ratio of the LQ made from the target.")
    resize_back: bool = Field(False, description="Return the LQ resized back to the target's size.")


def negative_degrade(hq: np.ndarray, rng: np.random.Generator, config: NegativeConfig | None = None) -> DegradedSample:
    config = config or NegativeConfig()
    height, width = hq.shape[:2]
    params = {
        "blur_sigma": float(rng.uniform(*config.blur_sigma)),
        "downsample_factor": float(rng.uniform(*config.downsample_factor)),
        "oversharpen": float(rng.uniform(*config.oversharpen)),
        "saturation": float(rng.uniform(*config.saturation)),
        "noise_sigma": float(rng.uniform(*config.noise_sigma)),
        "jpeg_quality": int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1)),
    }
    image = ops.gaussian_blur(ops.to_float(hq), params["blur_sigma"])
    factor = params["downsample_factor"]
    image = ops.resize(ops.resize(image, round(height / factor), round(width / factor), "bilinear"), height, width, "bilinear")
    halo = ops.gaussian_blur(image, 3.0)
    image = np.clip(image + params["oversharpen"] * (image - halo), 0, 1)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
    image = np.clip(grey + params["saturation"] * (image - grey), 0, 1)
    image = ops.gaussian_noise(image, params["noise_sigma"], gray=False, rng=rng)
    target = ops.jpeg(image, params["jpeg_quality"])
    lq = ops.resize(target, max(1, height // config.scale), max(1, width // config.scale), "area")
    if config.resize_back:
        lq = ops.resize(lq, height, width, "bicubic")
    record = [{"op": "negative_target", **params}, {"op": "resize", "scale": config.scale, "resize_back": config.resize_back}]
    return DegradedSample(hq=target, lq=lq, kind="negative", ops=record, restoration_prompt="")
