"""SUPIR's degradation-robust encoder: a trainable copy of the VAE encoder, the decoder kept frozen.

Trained (by `training/`) so that D(E_dr(x_LQ)) matches D(E(x_HQ)): the LQ image is mapped to the latent of its
clean counterpart, which is what the adaptor is conditioned on (z_LQ) and what restoration guidance pulls
towards. Starts as an exact copy of the VAE encoder, so before training it encodes like the VAE.

Shapes: images (B, 3, H, W) in [-1, 1]; latents (B, 4, H/8, W/8), already multiplied by the VAE's scaling factor.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class RobustEncoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(vae.encoder).requires_grad_(True)
        self.quant_conv = copy.deepcopy(vae.quant_conv).requires_grad_(True) if vae.quant_conv is not None else None
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The latent mean (no sampling: restoration wants the most likely latent), scaled like the VAE's."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, _ = moments.chunk(2, dim=1)
        return mean * self.scaling_factor
