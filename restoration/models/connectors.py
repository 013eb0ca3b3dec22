"""Connectors that join adaptor (control) features to the frozen UNet decoder.

- `ZeroSFT` (SUPIR): replaces the decoder's skip concatenation.
      h_raw = cat(h_dec, h_skip)
      h'    = cat(h_dec, h_skip + zero_conv1x1(c))
      a     = SiLU(conv3x3(c));  gamma = zero_conv3x3(a);  beta = zero_conv3x3(a)
      out   = GroupNorm(h') * (1 + gamma) + beta          (parameter-free by default, as in SFT/SPADE; SUPIR_v0: affine)
      return s * out + (1 - s) * h_raw                    (s: control scale; s = 0 is the frozen UNet exactly)
- `ZeroCrossAttn` (SUPIR): x + s * CrossAttn(GN(x), GN(c)) before the decoder's upsamplers. Its output projection is
  zero-initialised, so it starts as the identity; SUPIR's release leaves it random (a stated departure: an
  untrained connector should not perturb the frozen UNet).
- `ModulationFusion` (SPIRE): skip * (1 + gamma) + beta with gamma, beta from zero-initialised convs on the
  adaptor features; the identity at initialisation.

Shapes: h_dec (B, Cd, H, W), h_skip (B, Cs, H, W), c (B, Cc, H, W); x (B, Cx, H, W).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def zero_module(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def _groups(channels: int, preferred: int) -> int:
    """The largest group count <= preferred that divides `channels` (tiny widths need fewer than SDXL's 32)."""
    for groups in range(min(preferred, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class ZeroSFT(nn.Module):
    def __init__(
        self,
        control_channels: int,
        decoder_channels: int,
        skip_channels: int,
        hidden_channels: int = 128,
        norm_groups: int = 32,
        norm_affine: bool = False,
    ):
        super().__init__()
        total = decoder_channels + skip_channels
        self.decoder_channels = decoder_channels
        self.skip_add = zero_module(nn.Conv2d(control_channels, skip_channels, 1))
        self.shared = nn.Sequential(nn.Conv2d(control_channels, hidden_channels, 3, padding=1), nn.SiLU())
        self.gamma = zero_module(nn.Conv2d(hidden_channels, total, 3, padding=1))
        self.beta = zero_module(nn.Conv2d(hidden_channels, total, 3, padding=1))
        self.norm = nn.GroupNorm(_groups(total, norm_groups), total, affine=norm_affine)

    def forward(self, h_dec: torch.Tensor, h_skip: torch.Tensor, control: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h_raw = torch.cat([h_dec, h_skip], dim=1)
        if scale == 0:
            return h_raw
        h_mod = torch.cat([h_dec, h_skip + self.skip_add(control)], dim=1)
        hidden = self.shared(control)
        out = self.norm(h_mod) * (1 + self.gamma(hidden)) + self.beta(hidden)
        return scale * out + (1 - scale) * h_raw


class ModulationFusion(nn.Module):
    def __init__(self, control_channels: int, skip_channels: int):
        super().__init__()
        self.gamma = zero_module(nn.Conv2d(control_channels, skip_channels, 3, padding=1))
        self.beta = zero_module(nn.Conv2d(control_channels, skip_channels, 3, padding=1))

    def forward(self, h_dec: torch.Tensor, h_skip: torch.Tensor, control: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        if scale == 0:
            return torch.cat([h_dec, h_skip], dim=1)
        modulated = h_skip * (1 + scale * self.gamma(control)) + scale * self.beta(control)
        return torch.cat([h_dec, modulated], dim=1)


class ZeroCrossAttn(nn.Module):
    def __init__(self, channels: int, control_channels: int, heads: int = 8, norm_groups: int = 32):
        super().__init__()
        if channels % heads:
            raise ValueError(f"ZeroCrossAttn: {channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm_x = nn.GroupNorm(_groups(channels, norm_groups), channels)
        self.norm_c = nn.GroupNorm(_groups(control_channels, norm_groups), control_channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(control_channels, channels, bias=False)
        self.to_v = nn.Linear(control_channels, channels, bias=False)
        self.to_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, control: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        if scale == 0:
            return x
        batch, channels, height, width = x.shape
        query = self.to_q(self.norm_x(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        context = self.norm_c(control).flatten(2).transpose(1, 2)  # (B, HcWc, Cc)
        key, value = self.to_k(context), self.to_v(context)

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, heads, N, C/heads)
            return t.view(batch, -1, self.heads, channels // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(query), split(key), split(value))
        attended = attended.transpose(1, 2).reshape(batch, height * width, channels)
        return x + scale * self.to_out(attended).transpose(1, 2).reshape(batch, channels, height, width)
