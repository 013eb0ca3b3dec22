"""Basic quality: size, aspect ratio, flatness (entropy), sharpness (resolution-normalised), JPEG quality.

Every score is recorded in `quality` whether or not it filters; thresholds set to None only record.
Sharpness is the variance of the Laplacian measured after shrinking the short side to 256 px (smaller images
are measured as they are, never upscaled), so a photo and its downscaled copies score alike: a raw Laplacian
variance grows with downscaling.
"""

from __future__ import annotations

from pipelines.config import QualityConfig
from pipelines.rows import image_of, quality_of, reject, set_quality
from restoration.measures import entropy, sharpness


def quality_row(row: dict, config: QualityConfig) -> dict:
    image = image_of(row)
    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    scores = {"short_side": short, "aspect_ratio": round(long / short, 4), "entropy": round(entropy(image), 4)}
    scores["sharpness"] = round(sharpness(image), 3)
    set_quality(row, **scores)
    jpeg_quality = quality_of(row).get("jpeg_quality")
    if short < config.min_short_side:
        return reject(row, "quality", "too_small", f"short side {short} px < {config.min_short_side}")
    if long / short > config.max_aspect_ratio:
        return reject(row, "quality", "aspect_ratio", f"aspect ratio {long / short:.2f} > {config.max_aspect_ratio}")
    if config.min_entropy is not None and scores["entropy"] < config.min_entropy:
        return reject(row, "quality", "flat", f"grey-level entropy {scores['entropy']:.2f} bits < {config.min_entropy}")
    if config.min_sharpness is not None and scores["sharpness"] < config.min_sharpness:
        return reject(row, "quality", "blurry", f"sharpness {scores['sharpness']:.1f} < {config.min_sharpness}")
    if config.min_jpeg_quality is not None and jpeg_quality is not None and jpeg_quality < config.min_jpeg_quality:
        return reject(row, "quality", "low_jpeg_quality", f"estimated JPEG quality {jpeg_quality} < {config.min_jpeg_quality}")
    return row
