"""Pixels to bytes and back for the HTTP layer. Every function here is CPU work (a 4096² PNG encode takes seconds):
the ingress runs them off its event loop (`off_loop`), so /healthz and every other route keep answering meanwhile."""

from __future__ import annotations

import asyncio
import base64
import io
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# PIL and the decoders release the GIL for most of their work; a few threads keep several requests moving.
_POOL = ThreadPoolExecutor(4, thread_name_prefix="codec")


async def off_loop(fn, *args, **kwargs):
    """Run CPU work on the codec threads and await it (the event loop stays free)."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, partial(fn, *args, **kwargs))


def encode_image(image: np.ndarray, output_format: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    options = {"quality": 95} if output_format in ("jpeg", "webp") else {}
    Image.fromarray(image).save(buffer, format=output_format.upper(), **options)
    return buffer.getvalue()


def thumbnail(image: np.ndarray, side: int = 160) -> str:
    """A small JPEG of an image, base64 (what the answer shows of a retrieved reference)."""
    from PIL import Image

    picture = Image.fromarray(image)
    picture.thumbnail((side, side))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def as_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
