"""Precision and placement of the networks: which dtype a run holds them in, and what stays fp32.

`restore.dtype` ("auto" | "fp32" | "bf16" | "fp16"; auto = bf16 on CUDA, fp32 on CPU) names the dtype the UNet, the
adaptor and its connectors, the text encoders and the captioner are held and run in. Every network call casts its
inputs to the dtype of the network it calls and its output back to fp32, so what stays fp32 is whatever is not a
network call:
- the sampler's latents, sigmas, CFG and restoration-guidance arithmetic (`sampling.edm`), and the tile blending;
- the wavelet colour fix;
- the degradation estimator (tiny; its softmax picks the experts);
- under fp16, the VAE and the robust encoder (SDXL's VAE overflows in fp16; diffusers' `force_upcast` is a config
  flag its pipelines read, `AutoencoderKL.decode` never upcasts, so the Restorer holds them in fp32 itself).
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# restore.offload -> the network groups kept in CPU memory between their phases (`Restorer.to`; `restoray plan` sizes
# each phase from the same table): "text" = text encoders + captioner, "model" = UNet + adaptor, "vae" = VAE + robust encoder.
OFFLOADED = {"none": (), "model": ("text",), "all": ("text", "model", "vae")}


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """`restore.dtype` for a device: auto (or None) is bf16 on CUDA and fp32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {value: key for key, value in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def inference_device(num_gpus: float = 1.0) -> str:
    """Where a model runs: CUDA when GPUs are asked for and present, else the CPU."""
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's floating-point parameters (the first one's: modules are held in one dtype)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def vae_dtype(vae: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE (and the robust encoder copied from it) is held in for a run in `dtype`: fp32 under fp16 when
    the VAE's config says it must be upcast (SDXL's does), else `dtype`."""
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", True):
        return torch.float32
    return dtype


def place(module: torch.nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`module.to(device, dtype)` without diffusers' warning: `ModelMixin.to` warns on every dtype cast ("modules that
    should be kept in float32: []": its `_keep_in_fp32_modules or []` is never None), though SDXL's UNet and VAE keep
    none in fp32."""
    return torch.nn.Module.to(module, device, dtype)
