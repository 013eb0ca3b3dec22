"""Crop to the training size: resize the short side to `size`, then a centre or seeded random square."""

from __future__ import annotations

import cv2

from pipelines.config import CropConfig
from pipelines.rows import image_of, quality_of, set_image, set_quality
from restoration.seeding import numpy_generator


def crop_row(row: dict, config: CropConfig, seed: int) -> dict:
    image = image_of(row)
    height, width = image.shape[:2]
    scale = config.size / min(height, width)
    resized_h, resized_w = max(config.size, round(height * scale)), max(config.size, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(image, (resized_w, resized_h), interpolation=interpolation)
    if config.mode == "center":
        top, left = (resized_h - config.size) // 2, (resized_w - config.size) // 2
    else:
        rng = numpy_generator(seed, "crop", quality_of(row).get("sha256", row["source"]))  # content, not URI
        top, left = int(rng.integers(0, resized_h - config.size + 1)), int(rng.integers(0, resized_w - config.size + 1))
    set_image(row, resized[top : top + config.size, left : left + config.size])
    set_quality(row, crop_top_left=[top, left], crop_scale=round(scale, 5))
    return row
