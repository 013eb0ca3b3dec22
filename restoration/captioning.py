"""Captioning with the preset's VLM: one prompt template and one generate call, shared by the dataset build's
caption stage, `Restorer.caption` and serving's captioner, so a model is prompted the same way at training and at
inference.

The prompt is the processor's chat template around SUPIR's instruction when the processor has one (LLaVA-1.5,
most VLMs on the hub), else `"<image> {instruction}"` (the tiny preset's processor has no template).
"""

from __future__ import annotations

import torch
from PIL import Image

from restoration.models.base import IMAGE_TOKEN, Captioner


def caption_prompt(captioner: Captioner) -> str:
    processor = captioner.processor
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": captioner.prompt}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"{IMAGE_TOKEN} {captioner.prompt}"


@torch.no_grad()
def caption_images(captioner: Captioner, images: list[Image.Image]) -> list[str]:
    """One caption per image (greedy decoding, at most the preset's max_new_tokens), on the model's device."""
    if not images:
        return []
    parameter = next(captioner.model.parameters())
    inputs = captioner.processor(images=images, text=[caption_prompt(captioner)] * len(images), return_tensors="pt", padding=True)
    # Pixel values in the model's dtype (bf16/fp16 captioners); token ids stay integers.
    inputs = {
        key: value.to(parameter.device, parameter.dtype) if value.is_floating_point() else value.to(parameter.device)
        for key, value in inputs.items()
    }
    generated = captioner.model.generate(**inputs, max_new_tokens=captioner.max_new_tokens, do_sample=False)
    texts = captioner.processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [text.strip() for text in texts]
