"""Colour fix against the stage-1 image (SUPIR): the diffusion output keeps its detail, the reference its colours.

- `adain_color_fix`: per-channel mean and std of the reference.
- `wavelet_color_fix`: the output's high frequencies + the reference's low frequencies, split by repeated
  dilated 3x3 blurs (a stationary wavelet decomposition with `levels` levels).
Images (B, 3, H, W), any range; output in the range of the inputs.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean, std = image.mean(dim=(2, 3), keepdim=True), image.std(dim=(2, 3), keepdim=True) + eps
    ref_mean, ref_std = reference.mean(dim=(2, 3), keepdim=True), reference.std(dim=(2, 3), keepdim=True) + eps
    return (image - mean) / std * ref_std + ref_mean


def _blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=image.dtype, device=image.device) / 16
    kernel = kernel[None, None].repeat(image.shape[1], 1, 1, 1)
    padded = F.pad(image, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=image.shape[1], dilation=dilation)


def low_frequency(image: torch.Tensor, levels: int = 5) -> torch.Tensor:
    for level in range(levels):
        image = _blur(image, 2**level)
    return image


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    return image - low_frequency(image, levels) + low_frequency(reference, levels)
