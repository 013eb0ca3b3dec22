"""SUPIR's negative-quality samples, generated (kind `negative`): an actor pool holds the preset's SDXL and draws
`data.negatives.count` images from the negative-quality prompt; each image's LQ is made by the configured chain.

They are samples, not sources: no source row stands behind them (their `source` is `generated://negative/<seed>`),
the manifest counts them apart (`negatives_generated`), and the source invariant (in = accepted + rejected) does not
include them. A sample's id hashes the prompt and its seed, so a resumed build skips the ones already written.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch

from pipelines.config import NegativesConfig
from pipelines.rows import rows_of
from pipelines.stages.degrade import OUTPUT_COLUMNS
from pipelines.timer import report
from restoration.degradations import parameterized_degrade, realesrgan_degrade
from restoration.images import encode_jpeg, encode_png
from restoration.models.base import load_sdxl, scheduler_config
from restoration.models.presets import load_preset
from restoration.negatives import generate_images, negative_pipeline
from restoration.prompts import NEGATIVE_QUALITY_PROMPT
from restoration.seeding import numpy_generator, stable_seed

SOURCE_PREFIX = "generated://negative/"


def negative_seed(run_seed: int, index: int) -> int:
    return stable_seed(run_seed, "negative", index)


def negative_id(prompt: str, seed: int) -> str:
    return hashlib.sha256(f"negative\n{prompt}\n{seed}".encode()).hexdigest()[:32]


class GenerateNegativesStage:
    def __init__(self, preset: str, config: NegativesConfig, seed: int, size: int, image_format: str, chains, timer=None):
        spec = load_preset(preset)
        networks = load_sdxl(spec).frozen()
        self.device = "cuda" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.pipeline = negative_pipeline(networks, scheduler_config(spec)).to(self.device)
        self.config, self.seed, self.size, self.image_format, self.chains, self.timer = config, seed, size, image_format, chains, timer

    def _encode(self, image: np.ndarray) -> bytes:
        return encode_png(image) if self.image_format == "png" else encode_jpeg(image, 95)

    def __call__(self, batch: dict) -> dict:
        started = time.perf_counter()
        indices = [int(row["index"]) for row in rows_of(batch)]
        seeds = [negative_seed(self.seed, index) for index in indices]
        config = self.config
        images = generate_images(self.pipeline, NEGATIVE_QUALITY_PROMPT, seeds, self.size, config.steps, config.guidance)
        out = []
        for seed, image in zip(seeds, images, strict=True):
            rng = numpy_generator(self.seed, "negative-lq", seed)
            if config.chain == "realesrgan":
                sample = realesrgan_degrade(image, rng, self.chains.realesrgan)
            else:
                sample = parameterized_degrade(image, rng, self.chains.parameterized)
            generation = {
                "op": "generate",
                "prompt": NEGATIVE_QUALITY_PROMPT,
                "seed": seed,
                "steps": config.steps,
                "guidance": config.guidance,
            }
            out.append(
                {
                    "id": negative_id(NEGATIVE_QUALITY_PROMPT, seed),
                    "source": f"{SOURCE_PREFIX}{seed}",
                    "caption": NEGATIVE_QUALITY_PROMPT,
                    "alt_text": None,
                    "hq": self._encode(sample.hq),  # the chain's target (Real-ESRGAN's USM-sharpened one, by default)
                    "lq": self._encode(sample.lq),
                    "height": int(image.shape[0]),
                    "width": int(image.shape[1]),
                    "kind": "negative",
                    "degradation": json.dumps([generation, *sample.ops]),
                    "restoration_prompt": sample.restoration_prompt,
                    "mask": None,
                    "quality": json.dumps({"generated": True}),
                }
            )
        if self.timer is not None:
            report(self.timer, "generate negatives", len(out), time.perf_counter() - started)
        return {column: np.array([row.get(column) for row in out] + [None], dtype=object)[:-1] for column in OUTPUT_COLUMNS}
