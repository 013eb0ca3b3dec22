"""ReFIR's cross-image injection: decoder self-attention that also looks at a retrieved high-quality reference.

Training-free. A *reference chain* runs the same UNet (same weights, noise level and timestep) on the reference
latent and records, at each chosen decoder self-attention layer, its keys, values and input features. The target
chain then computes, per layer:
    O_intra = softmax(Q_T K_T^T / sqrt(d)) V_T            (the layer's own attention)
    O_inter = softmax(Q_T K_S^T / sqrt(d)) V_S            (separate attention into the reference)
    M       = per target token, the mean cosine similarity of its input feature to all reference tokens'
              features, min-max normalised per image          (spatial adaptive gate)
    O       = (1 - s M) O_intra + s M O_inter               (s: gate scale; s = 0 is the plain layer)
    O       = AdaIN(O, O_intra)                            (distribution alignment: per-channel mean/std of O_intra)
then the layer's output projection. Several references: each reference's O_inter is weighted by the softmax of
its mean similarity; references whose mean similarity is under `similarity_threshold` are not used.

Use: `install(unet, controller, layer_filter)` sets `ReferenceAttnProcessor`s on the UNet's decoder self-attention
layers; `controller.mode = "record"` for the reference pass(es), then `"inject"` for the target pass.
Shapes: hidden (B, N, C) tokens; per-head q/k/v (B, heads, N, d).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F


@dataclass
class InjectionConfig:
    gate_scale: float = 1.0
    similarity_threshold: float = -1.0


@dataclass
class ReferenceController:
    config: InjectionConfig = field(default_factory=InjectionConfig)
    mode: str = "off"  # "off" | "record" | "inject"
    recorded: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def clear(self) -> None:
        self.recorded.clear()


def _heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, channels = tensor.shape
    return tensor.view(batch, tokens, heads, channels // heads).transpose(1, 2)


def _merge(tensor: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, dim = tensor.shape
    return tensor.transpose(1, 2).reshape(batch, tokens, heads * dim)


def spatial_gate(target_features: torch.Tensor, reference_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate (B, N_T, 1) in [0, 1], mean similarity (B,)) from token features (B, N_T, C) and (B, N_S, C)."""
    target = F.normalize(target_features.float(), dim=-1)
    reference = F.normalize(reference_features.float(), dim=-1)
    similarity = (target @ reference.mean(dim=1, keepdim=True).transpose(1, 2)).squeeze(-1)  # mean cosine to all ref tokens
    low, high = similarity.amin(dim=1, keepdim=True), similarity.amax(dim=1, keepdim=True)
    gate = (similarity - low) / (high - low).clamp(min=1e-6)
    return gate.unsqueeze(-1).to(target_features.dtype), similarity.mean(dim=1)


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give `content` (B, N, C) the per-channel mean and std of `style` over tokens."""
    content_mean, content_std = content.mean(dim=1, keepdim=True), content.std(dim=1, keepdim=True) + eps
    style_mean, style_std = style.mean(dim=1, keepdim=True), style.std(dim=1, keepdim=True) + eps
    return (content - content_mean) / content_std * style_std + style_mean


class ReferenceAttnProcessor:
    """A diffusers attention processor for self-attention layers (3-D token input, no residual inside)."""

    def __init__(self, controller: ReferenceController, name: str, fallback=None):
        self.controller = controller
        self.name = name
        # The layer's own processor: when this one neither records nor injects, the layer is bit-for-bit itself.
        self.fallback = fallback

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        controller = self.controller
        injecting = controller.mode == "inject" and controller.recorded.get(self.name) and controller.config.gate_scale != 0
        if self.fallback is not None and controller.mode != "record" and not injecting:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if hidden_states.ndim != 3 or encoder_hidden_states is not None:
            raise ValueError(f"{self.name}: ReFIR injection is for self-attention over (B, N, C) tokens")
        query = _heads(attn.to_q(hidden_states), attn.heads)
        key = _heads(attn.to_k(hidden_states), attn.heads)
        value = _heads(attn.to_v(hidden_states), attn.heads)
        intra = _merge(F.scaled_dot_product_attention(query, key, value))
        output = intra
        if controller.mode == "record":
            controller.recorded.setdefault(self.name, []).append((key, value, hidden_states))
        elif controller.mode == "inject" and controller.recorded.get(self.name) and controller.config.gate_scale != 0:
            inters, gates, scores = [], [], []
            for ref_key, ref_value, ref_features in controller.recorded[self.name]:
                gate, score = spatial_gate(hidden_states, ref_features)
                inters.append(_merge(F.scaled_dot_product_attention(query, ref_key, ref_value)))
                gates.append(gate)
                scores.append(score)
            score_stack = torch.stack(scores, dim=1)  # (B, R)
            usable = score_stack >= controller.config.similarity_threshold
            if usable.any():
                weights = score_stack.masked_fill(~usable, float("-inf")).softmax(dim=1).nan_to_num(0.0)  # (B, R)
                inter = sum(w[:, None, None] * o for w, o in zip(weights.unbind(1), inters, strict=True))
                gate = sum(w[:, None, None] * g for w, g in zip(weights.unbind(1), gates, strict=True))
                gate = gate * usable.any(dim=1).to(gate.dtype)[:, None, None]
                scale = controller.config.gate_scale
                fused = (1 - scale * gate) * intra + scale * gate * inter
                output = adain(fused, intra)
        output = attn.to_out[0](output)
        return attn.to_out[1](output)


def decoder_self_attention_layers(unet) -> list[str]:
    """Names of the UNet decoder's self-attention modules (attn1 of the up blocks' transformer blocks)."""
    return [name for name, _ in unet.attn_processors.items() if name.startswith("up_blocks") and ".attn1." in name]


def install(unet, controller: ReferenceController, layer_filter: Callable[[str], bool] | None = None) -> list[str]:
    """Put ReFIR processors on the chosen decoder self-attention layers (all by default); returns their names."""
    chosen = [name for name in decoder_self_attention_layers(unet) if layer_filter is None or layer_filter(name)]
    processors = dict(unet.attn_processors)
    for name in chosen:
        processors[name] = ReferenceAttnProcessor(controller, name, fallback=processors[name])
    unet.set_attn_processor(processors)
    return chosen
