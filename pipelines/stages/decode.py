"""Validate/decode: bytes -> upright RGB pixels, or a reject with the decoder's reason code."""

from __future__ import annotations

import hashlib

from pipelines.config import DecodeConfig
from pipelines.rows import reject, set_image, set_quality
from restoration.images import ImageDecodeError, decode_image
from restoration.measures import estimate_jpeg_quality


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
