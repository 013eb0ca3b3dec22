"""Image measurements the dataset build filters and deduplicates with, as pure functions of pixels or bytes.

- `sharpness`: variance of the Laplacian after shrinking the short side to 256 px (never upscaled), so a photo and
  its downscaled copies score alike (a raw Laplacian variance grows with downscaling);
- `entropy`: grey-level entropy in bits (flat images score low);
- `estimate_jpeg_quality`: the IJG quality whose luminance quantisation table is closest to the file's;
- `perceptual_hash` / `hamming`: 64-bit DCT pHash and the distance between two.

Shapes: images are (H, W, 3) uint8 RGB.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from restoration.jpeg_tables import ijg_tables

SHARPNESS_SHORT_SIDE = 256


def grey_at(image: np.ndarray, short_side: int) -> np.ndarray:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    height, width = grey.shape
    scale = short_side / min(height, width)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(grey, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=interpolation)


def sharpness(image: np.ndarray) -> float:
    return float(cv2.Laplacian(grey_at(image, min(SHARPNESS_SHORT_SIDE, min(image.shape[:2]))), cv2.CV_64F).var())


def entropy(image: np.ndarray) -> float:
    histogram = np.bincount(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).ravel(), minlength=256).astype(np.float64)
    p = histogram[histogram > 0] / histogram.sum()
    return float(-(p * np.log2(p)).sum())


def _ijg_table(quality: int) -> np.ndarray:
    return ijg_tables(quality, libjpeg_rounding=True)[0]


_TABLE_SUMS = np.array([_ijg_table(q).sum() for q in range(1, 101)])


def estimate_jpeg_quality(data: bytes) -> int | None:
    """The IJG quality whose luminance table is closest to the file's (by table sum, so coefficient order does
    not matter); None for non-JPEG data."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        tables = Image.open(io.BytesIO(data)).quantization
    except Exception:
        return None
    if not tables:
        return None
    luma_sum = float(np.sum(tables[min(tables)]))
    return int(np.argmin(np.abs(_TABLE_SUMS - luma_sum)) + 1)


def perceptual_hash(image: np.ndarray) -> int:
    """pHash: DCT of the 32x32 grey image, the 8x8 lowest frequencies against their median (DC left out)."""
    grey = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(grey)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value - (1 << 64) if value >= 1 << 63 else value  # stored as a signed int64


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & ((1 << 64) - 1)).count("1")
