"""ABAIR's degradation estimator: a light CNN on the LQ image -> a distribution over degradation types.

It picks (one-hot) or blends (soft weights) the LoRA experts. Trained with cross-entropy against the per-type
pixel fractions of `composite` and `single` masks. `type_ids` maps output index -> registry id, so adding a type
means a new output row (and a retrained estimator) while the experts already trained stay untouched.

Shapes: images (B, 3, H, W) in [-1, 1] (any size: global average pooling); logits (B, T).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DegradationEstimator(nn.Module):
    def __init__(self, type_ids: list[int], width: int = 32):
        super().__init__()
        if not type_ids or len(set(type_ids)) != len(type_ids) or 0 in type_ids:
            raise ValueError(f"type_ids must be distinct registry ids (0 is clean), got {type_ids}")
        self.type_ids = list(type_ids)
        self.width = width
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, len(type_ids))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))

    def weights(self, images: torch.Tensor, mode: str = "soft") -> torch.Tensor:
        """Expert weights (B, T): softmax ('soft') or its arg-max as one-hot ('one_hot')."""
        probabilities = self(images).softmax(dim=-1)
        if mode == "soft":
            return probabilities
        if mode == "one_hot":
            return F.one_hot(probabilities.argmax(dim=-1), len(self.type_ids)).to(probabilities.dtype)
        raise ValueError(f"unknown blending mode {mode!r}; use 'soft' or 'one_hot' (or give oracle weights)")

    def mask_targets(self, masks: torch.Tensor) -> torch.Tensor:
        """Per-type pixel fractions of uint8 masks (B, H, W), over the degraded pixels only: the training target."""
        counts = torch.stack([(masks == type_id).flatten(1).sum(1) for type_id in self.type_ids], dim=1).float()
        return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(images), self.mask_targets(masks))
