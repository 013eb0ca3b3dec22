"""Captioning with the preset's VLM (an actor pool), in one of three modes.

- keep-source: the corpus caption is the training caption (no model is loaded; this stage is skipped);
- generate: the VLM's caption replaces it;
- generate-and-keep-alt: the VLM's caption, with the corpus caption kept in `alt_text`.
"""

from __future__ import annotations

import torch
from PIL import Image

from pipelines.config import CaptionConfig
from pipelines.rows import image_of, run_on_live
from restoration.captioning import caption_images
from restoration.models.base import load_captioner
from restoration.models.presets import load_preset


class CaptionStage:
    def __init__(self, preset: str, config: CaptionConfig, timer=None):
        spec = load_preset(preset)
        self.captioner = load_captioner(spec.captioner, spec.tokenizer, seed=spec.seed)
        self.device = "cuda" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.captioner.model.to(self.device).eval()
        self.config = config
        self.timer = timer

    def __call__(self, batch: dict) -> dict:
        return run_on_live("caption", batch, self._caption, self.timer)

    def _caption(self, live: list[dict]) -> None:
        texts = caption_images(self.captioner, [Image.fromarray(image_of(row)) for row in live])
        for row, text in zip(live, texts, strict=True):
            source_caption = row.get("alt_text")
            row["caption"] = text
            row["alt_text"] = source_caption if self.config.mode == "generate-and-keep-alt" else None
