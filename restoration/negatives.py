"""SUPIR's negative-quality samples: images the SDXL base itself generates from the negative-quality prompt.

SUPIR trains on such images, captioned with that prompt, so that classifier-free guidance has something concrete
to steer away from. The generation is diffusers' `StableDiffusionXLPipeline` on the preset's own networks with an
Euler scheduler on the base's training schedule; nothing of the method is rewritten here. Each image's noise comes
from its own seed, so an image depends only on (prompt, seed, size, steps, guidance), not on batching.

Shapes: images (H, W, 3) uint8 RGB.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from restoration.models.base import SDXLNetworks


def negative_pipeline(networks: SDXLNetworks, scheduler_config: dict):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    known = {key: value for key, value in scheduler_config.items() if not key.startswith("_")}
    return StableDiffusionXLPipeline(
        vae=networks.vae,
        text_encoder=networks.text_encoder,
        text_encoder_2=networks.text_encoder_2,
        tokenizer=networks.tokenizer,
        tokenizer_2=networks.tokenizer_2,
        unet=networks.unet,
        scheduler=EulerDiscreteScheduler.from_config(known),
        add_watermarker=False,
    )


@torch.no_grad()
def generate_images(pipeline, prompt: str, seeds: Sequence[int], size: int, steps: int, guidance: float) -> list[np.ndarray]:
    """One image per seed, `size` x `size`, from `prompt`."""
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    output = pipeline(
        prompt=[prompt] * len(seeds),
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators,
        output_type="np",
    )
    return [(np.clip(image, 0, 1) * 255).round().astype(np.uint8) for image in output.images]
