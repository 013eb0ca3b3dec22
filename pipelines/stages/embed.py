"""CLIP embedding (once per image), aesthetic score, and the image-text score after captioning.

Both are callable classes for Ray Data actor pools: the model loads in `__init__`, batches run in `__call__`.
The aesthetic score is a linear head on the normalised image embedding (LAION's predictor is one such layer);
a preset names its weights, or `random` for tiny presets, whose scores only exercise the plumbing.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipelines.config import EmbedConfig
from pipelines.rows import image_of, reject, run_on_live, set_quality
from restoration.models.base import load_aesthetic_head, load_clip_scorer
from restoration.models.presets import load_preset


class _ClipActor:
    def __init__(self, preset: str, config: EmbedConfig, timer=None):
        self.spec = load_preset(preset)
        self.scorer = load_clip_scorer(self.spec.clip_scorer, seed=self.spec.seed)
        self.device = "cuda" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.scorer.model.to(self.device)
        self.config = config
        self.timer = timer


class EmbedStage(_ClipActor):
    def __init__(self, preset: str, config: EmbedConfig, timer=None):
        super().__init__(preset, config, timer)
        self.aesthetic_head = load_aesthetic_head(self.spec.clip_scorer, seed=self.spec.seed)

    def __call__(self, batch: dict) -> dict:
        return run_on_live("embed", batch, self._embed, self.timer)

    @torch.no_grad()
    def _embed(self, live: list[dict]) -> None:
        embeddings = self.scorer.embed_images([Image.fromarray(image_of(row)) for row in live])
        aesthetics = self.aesthetic_head(embeddings).squeeze(-1) if self.aesthetic_head is not None else None
        for index, row in enumerate(live):
            row["embedding"] = embeddings[index].numpy().astype(np.float32).tobytes()
            if aesthetics is not None:
                score = round(float(aesthetics[index]), 4)
                set_quality(row, aesthetic=score)
                if self.config.min_aesthetic is not None and score < self.config.min_aesthetic:
                    reject(row, "embed", "low_aesthetic", f"aesthetic score {score:.3f} < {self.config.min_aesthetic}")


class ClipScoreStage(_ClipActor):
    """Cosine between the stored image embedding and the caption's text embedding."""

    def __call__(self, batch: dict) -> dict:
        return run_on_live("score", batch, self._score, self.timer, wanted=lambda row: row.get("embedding") is not None)

    @torch.no_grad()
    def _score(self, live: list[dict]) -> None:
        tokens = self.scorer.tokenizer([row.get("caption") or "" for row in live]).to(self.device)
        texts = torch.nn.functional.normalize(self.scorer.model.encode_text(tokens).float(), dim=-1).cpu()
        for index, row in enumerate(live):
            image = torch.from_numpy(np.frombuffer(row["embedding"], np.float32).copy())
            score = round(float(image @ texts[index]), 4)
            set_quality(row, clip_score=score)
            if self.config.min_clip_score is not None and score < self.config.min_clip_score:
                reject(row, "score", "low_clip_score", f"image-text score {score:.3f} < {self.config.min_clip_score}")
