"""An original single-file SDXL checkpoint (sgm names, e.g. `sd_xl_base_1.0_0.9vae.safetensors`, the file SUPIR
loads) -> the SDXL networks in diffusers' classes, offline.

diffusers' own single-file loading fetches each network's config from the Hub; here the configs are written in the
project (`base_configs/*.json`, SDXL base 1.0's) and only diffusers' key converters are used: the UNet
(`model.diffusion_model.*`, `convert_ldm_unet_checkpoint`), the VAE (`first_stage_model.*`,
`convert_ldm_vae_checkpoint`), CLIP ViT-L (`conditioner.embedders.0.transformer.*`, already in transformers' names)
and OpenCLIP bigG (`conditioner.embedders.1.model.*`, `convert_open_clip_checkpoint`). The tokenizers are CLIP's BPE,
which the presets build offline (`vocabulary = "open_clip_bpe"`), and the scheduler is SDXL's training schedule.
Networks are built on the meta device and take the checkpoint's tensors as they are (no second copy in memory).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch

from restoration.models.supir_checkpoint import CheckpointMismatch

BASE_CONFIGS = Path(__file__).with_name("base_configs")
UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


@cache
def base_config(name: str) -> dict[str, Any]:
    """SDXL base 1.0's config of one network: unet, vae, text_encoder, text_encoder_2, scheduler."""
    data = json.loads((BASE_CONFIGS / f"sdxl_{name}.json").read_text(encoding="utf-8"))
    return {key: value for key, value in data.items() if not key.startswith("_")}


def is_sdxl_single_file(keys) -> bool:
    keys = list(keys)
    return any(k.startswith(UNET + "output_blocks.") for k in keys) and any(k.startswith(OPEN_CLIP) for k in keys)


def _load(module: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str) -> torch.nn.Module:
    missing, unexpected = module.load_state_dict(dict(state), strict=False, assign=True)
    missing = [key for key in missing if not key.endswith("position_ids")]  # a buffer transformers rebuilds
    if missing or unexpected:
        raise CheckpointMismatch(f"{name}: the checkpoint does not fit SDXL's config (missing {missing[:4]}, unexpected {unexpected[:4]})")
    for buffer_name, buffer in list(module.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers the checkpoint cannot hold: position ids
            if not buffer_name.endswith("position_ids"):
                raise CheckpointMismatch(f"{name}: buffer {buffer_name} has no value")
            owner = module.get_submodule(buffer_name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    return module.eval()


def convert_sdxl_single_file(
    checkpoint: Mapping[str, torch.Tensor], configs: Mapping[str, dict] | None = None
) -> dict[str, torch.nn.Module]:
    """{unet, vae, text_encoder, text_encoder_2} from one sgm-named checkpoint. `configs` (by network name) default
    to SDXL base 1.0's; tests pass small ones."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = {name: dict((configs or {}).get(name) or base_config(name)) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    for prefix in (UNET, VAE, CLIP_L, OPEN_CLIP):
        if not any(key.startswith(prefix) for key in checkpoint):
            raise CheckpointMismatch(f"no tensors under {prefix!r}: not an SDXL single-file checkpoint")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    # sgm stored transformers' CLIPTextModel names of its day ("text_model.embeddings..."; old files also hold the
    # position_ids buffer); transformers 5 dropped the "text_model." level of CLIPTextModel.
    clip_l = {key[len(CLIP_L) :]: value for key, value in checkpoint.items() if key.startswith(CLIP_L) and not key.endswith("position_ids")}
    if not any(name.startswith("text_model.") for name in text_encoder.state_dict()):
        clip_l = {key.removeprefix("text_model."): value for key, value in clip_l.items()}
    return {
        "unet": _load(unet, convert_ldm_unet_checkpoint(checkpoint, configs["unet"]), "unet"),
        "vae": _load(vae, convert_ldm_vae_checkpoint(checkpoint, configs["vae"]), "vae"),
        "text_encoder": _load(text_encoder, clip_l, "text_encoder"),
        "text_encoder_2": _load(
            text_encoder_2, convert_open_clip_checkpoint(text_encoder_2, checkpoint, prefix=OPEN_CLIP), "text_encoder_2"
        ),
    }
