"""Decode, validate and encode images.

`decode_image(data)` turns the bytes of any JPEG, PNG, WebP, TIFF, BMP or GIF (first frame) into an upright
HxWx3 uint8 RGB array, or raises `ImageDecodeError` whose `reason` is one of DESIGN.md's reject codes:

- `empty`: zero bytes;
- `not_image`: bytes no decoder recognises (text, HTML, ...);
- `too_large`: width*height over `max_pixels`, checked from the header **before** pixels are decoded;
- `truncated`: a recognised image whose data ends early or is corrupt;
- `read_error`: anything else the decoder raised.

Modes: L/1 are spread to RGB; LA, RGBA, PA and P with transparency are composited on white; CMYK, YCbCr, LAB and
HSV are converted; 16-bit (I;16*) and 32-bit (I) integers are scaled from the 16-bit range, floats (F) from [0, 1]
(or [0, 255] when the data exceeds 1).
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from restoration.errors import InputError

DEFAULT_MAX_PIXELS = 64_000_000
REASONS = ("empty", "truncated", "not_image", "too_large", "read_error")


class ImageDecodeError(InputError):
    """An image that cannot be used; `reason` is a DESIGN.md reject code."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> upright HxWx3 uint8 RGB. Raises `ImageDecodeError` with a reason code."""
    if not data:
        raise ImageDecodeError("empty", "zero bytes")
    with warnings.catch_warnings():
        # Our own pixel limit replaces PIL's bomb heuristics; its warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            # PIL refuses headers over 2x its own limit (~179 MP) before we see the size.
            raise ImageDecodeError("too_large", f"{err} (our limit: {max_pixels:,} pixels)") from err
        except UnidentifiedImageError as err:
            raise ImageDecodeError("not_image", f"no decoder recognises these {len(data)} bytes (starts {data[:16]!r})") from err
        except (OSError, SyntaxError, EOFError) as err:
            reason = "truncated" if "truncat" in str(err).lower() or isinstance(err, EOFError) else "read_error"
            raise ImageDecodeError(reason, f"header unreadable: {type(err).__name__}: {err}") from err
        except Exception as err:
            raise ImageDecodeError("read_error", f"{type(err).__name__}: {err}") from err
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError("too_large", f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}")
        if width == 0 or height == 0:
            raise ImageDecodeError("truncated", f"{image.format} header says {width}x{height}")
        try:
            image.seek(0)  # GIF/TIFF/WebP animations: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
        except Image.DecompressionBombError as err:
            raise ImageDecodeError("too_large", str(err)) from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageDecodeError("truncated", f"{image.format} data is truncated or corrupt: {err}") from err
        except Exception as err:
            raise ImageDecodeError("read_error", f"{type(err).__name__}: {err}") from err
    return to_rgb8(image)


def to_rgb8(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        composited = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(composited + 0.5, 0, 255).astype(np.uint8)
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64) if mode == "I" else np.asarray(image).astype(np.float64)
        grey = np.clip(values / 257.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        grey = np.clip(np.nan_to_num(values) * scale + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(_check_rgb8(rgb), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A single-channel uint8 mask (degradation type ids) as a greyscale PNG."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"expected an HxW uint8 mask, got {mask.dtype} {mask.shape}")
    ok, buffer = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(_check_rgb8(rgb), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buffer.tobytes()


def _check_rgb8(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    return rgb
