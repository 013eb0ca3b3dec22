"""Validate/decode: bytes -> upright RGB pixels, or a reject with the decoder's reason code."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from pipelines.config import DecodeConfig
from pipelines.rows import reject, set_image, set_quality
from restoration.images import ImageDecodeError, decode_image

# The IJG luminance table at quality 50; libjpeg scales it linearly for other qualities.
_IJG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
).ravel()


def _ijg_table(quality: int) -> np.ndarray:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((_IJG_LUMA * scale + 50) / 100), 1, 255)


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


def decode_row(row: dict, config: DecodeConfig, max_caption_chars: int) -> dict:
    # The caption as found stays in alt_text; training gets it cut to a sane length.
    found = row.get("caption")
    row["alt_text"] = found
    row["caption"] = found[:max_caption_chars] if found else ""
    if row.get("error"):
        reason, _, detail = row["error"].partition(": ")
        return reject(
            row, "read", reason if reason in ("read_error", "not_image", "caption_error") else "read_error", detail or row["error"]
        )
    data = row["data"]
    try:
        image = decode_image(data or b"", max_pixels=config.max_pixels)
    except ImageDecodeError as err:
        return reject(row, "decode", err.reason, err.detail)
    set_image(row, image)
    jpeg_quality = estimate_jpeg_quality(data)
    set_quality(
        row,
        source_height=image.shape[0],
        source_width=image.shape[1],
        bytes=len(data),
        jpeg_quality=jpeg_quality,
        sha256=hashlib.sha256(data).hexdigest(),
        caption_chars=len(found or ""),
    )
    return row
