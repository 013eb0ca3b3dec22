"""`index build`'s model stage: each source's open-clip embedding (or the one `data build` stored) and its
reference-store image, resized to the restoration model's size (short side = the preset's native size)."""

from __future__ import annotations

import time

import cv2
import numpy as np
from PIL import Image

from pipelines.config import IndexEmbedConfig
from pipelines.rows import image_of, is_rejected, rows_of
from pipelines.timer import report
from restoration.dataset import source_id
from restoration.images import encode_jpeg, encode_png

OUTPUT_COLUMNS = ("id", "source", "embedding", "image", "width", "height", "reject_stage", "reject_reason", "reject_detail")


def reference_image(image: np.ndarray, short_side: int) -> np.ndarray:
    """The source scaled so its short side is `short_side` (area filter shrinking, bicubic enlarging)."""
    height, width = image.shape[:2]
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


class ReferenceStage:
    """Ray Data actor: the model loads on the first source without a stored embedding (none with --embeddings: the
    read task attached each source's stored embedding to its row, pipelines/known_sources.py)."""

    def __init__(self, preset: str, config: IndexEmbedConfig, short_side: int, image_format: str, timer=None):
        self.preset = preset
        self.config = config
        self.short_side = short_side
        self.image_format = image_format
        self.timer = timer
        self.scorer = None

    def _scorer(self):
        if self.scorer is None:
            import torch

            from restoration.models.base import load_clip_scorer
            from restoration.models.presets import load_preset

            spec = load_preset(self.preset)
            self.scorer = load_clip_scorer(spec.clip_scorer, seed=spec.seed)
            self.scorer.model.to("cuda" if self.config.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        return self.scorer

    def __call__(self, batch: dict) -> dict:
        started = time.perf_counter()
        rows = rows_of(batch)
        live = [row for row in rows if not is_rejected(row)]
        missing = [row for row in live if row.get("embedding") is None]
        if missing:
            embeddings = self._scorer().embed_images([Image.fromarray(image_of(row)) for row in missing]).numpy()
            for row, embedding in zip(missing, embeddings, strict=True):
                row["embedding"] = embedding.astype("<f4").tobytes()
        for row in live:
            image = reference_image(image_of(row), self.short_side)
            row["image"] = encode_png(image) if self.image_format == "png" else encode_jpeg(image, 95)
            row["height"], row["width"] = int(image.shape[0]), int(image.shape[1])
            row["id"] = source_id(row["source"])
        if self.timer is not None:
            report(self.timer, "embed", len(live), time.perf_counter() - started)
        return {column: np.array([row.get(column) for row in rows] + [None], dtype=object)[:-1] for column in OUTPUT_COLUMNS}
