"""The bundled sample corpus: photographs scikit-image ships, materialised as an image folder with captions.

`materialise(directory)` writes `<name>.png` and `<name>.txt` (the caption, UTF-8) for each sample listed in
`samples.toml`. It is idempotent: files already there with the right content are left alone, and each file is
written to a temporary name and renamed, so an interrupted run never leaves a half-written image behind.
"""

from __future__ import annotations

import io
import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from restoration.errors import InputError

log = logging.getLogger(__name__)
SAMPLES_FILE = Path(__file__).with_name("samples.toml")


@dataclass(frozen=True)
class Sample:
    name: str
    loader: str
    caption: str

    def load(self) -> np.ndarray:
        """The photograph as HxWx3 uint8 RGB (grey ones are repeated over three channels)."""
        import skimage.data

        function_name, _, index = self.loader.partition(":")
        image = getattr(skimage.data, function_name)()
        if index:
            image = image[int(index)]
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def list_samples() -> list[Sample]:
    data = tomllib.loads(SAMPLES_FILE.read_text(encoding="utf-8"))
    return [Sample(**entry) for entry in data["sample"]]


def materialise(directory: str | Path) -> list[Path]:
    """Write every sample image and caption under `directory`; returns the image paths in listing order."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the samples directory {str(directory)!r}: {err}") from err
    written, image_paths = 0, []
    for sample in list_samples():
        image_path, caption_path = directory / f"{sample.name}.png", directory / f"{sample.name}.txt"
        if not image_path.exists():
            buffer = io.BytesIO()
            Image.fromarray(sample.load()).save(buffer, format="PNG")
            _write_atomic(image_path, buffer.getvalue())
            written += 1
        caption = (sample.caption + "\n").encode("utf-8")
        if not caption_path.exists() or caption_path.read_bytes() != caption:
            _write_atomic(caption_path, caption)
        image_paths.append(image_path)
    log.info("sample corpus: %d images in %s (%d newly written)", len(image_paths), directory, written)
    return image_paths


def _write_atomic(path: Path, payload: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_bytes(payload)
    os.replace(partial, path)
