"""ReFIR's cross-image injection: decoder self-attention that also looks at retrieved high-quality references.

Training-free. The *reference chain* (restorer.ReferenceChain) runs the references through the same adapted model
on their own trajectory; while it does, the controller is in "record" mode and keeps, per decoder self-attention
layer, the references' keys and values, and per decoder position (one diffusers (up block, attention) position =
one ldm output block) the features the connector joined there. The target pass then runs in "inject" mode:
    M       = per target token, the mean cosine similarity of its joined feature (connector output) to all of a
              reference's tokens, min-max normalised per image; computed once per decoder position and shared by
              every self-attention layer of that position's transformer (ReFIR's spatial adaptive gate)
    O_intra = softmax(Q_T K_T^T / sqrt(d)) V_T            (the layer's own attention)
    O_inter = softmax(Q_T K_S^T / sqrt(d)) V_S            (separate attention into the reference)
    O       = (1 - s M) O_intra + s M O_inter               (s: gate scale; s = 0 is the plain layer)
    O       = AdaIN(O, O_intra)                            (distribution alignment: per-channel mean/std of O_intra)
then the layer's output projection. Several references: each reference's O_inter and gate are weighted by the
softmax of its mean similarity; references whose mean similarity is under `similarity_threshold` are not used.
A target processed in tiles injects per tile: each tile attends to whole references, its gate normalised per tile.

When target and references have one shape (no tiling), the chain runs them as one batch [target, references]
("batched": upstream's layout, one forward instead of two); a tiled target records first, then injects per tile.

Use: `install(model, controller)` sets `ReferenceAttnProcessor`s on the decoder self-attention layers of
`model.unet` and the controller as `model.block_observer`; `uninstall(model, processors)` puts things back.
Shapes: hidden (B, N, C) tokens; per-head q/k/v (B, heads, N, d); recorded keys/values (R, heads, N_S, d).
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


def block_of(layer: str) -> str:
    """The decoder position a self-attention layer belongs to: 'up_blocks.0.attentions.1.transformer_blocks.3.attn1'
    -> 'up_blocks.0.attentions.1' (where the gate is computed)."""
    return layer.split(".transformer_blocks.")[0]


@dataclass
class ReferenceController:
    config: InjectionConfig = field(default_factory=InjectionConfig)
    mode: str = "off"  # "off" | "record" | "inject" | "batched" (rows >= split are references, recorded and injected at once)
    split: int = 1
    recorded: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (keys, values)
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # decoder position -> reference tokens (R, N, C)
    gates: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # position -> (gates, scores)

    def clear(self) -> None:
        self.recorded.clear()
        self.features.clear()
        self.gates.clear()

    @property
    def injecting(self) -> bool:
        return self.mode == "batched" or (self.mode == "inject" and bool(self.recorded))

    def __call__(self, block: str, joined: torch.Tensor) -> None:
        """The model's block observer: the joined features (B, C, H, W) at a decoder position."""
        tokens = joined.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.mode == "batched":
            tokens, self.features[block] = tokens[: self.split], tokens[self.split :]
        elif self.mode == "record":
            self.features[block] = tokens
        if self.injecting and self.config.gate_scale != 0 and block in self.features:
            references = self.features[block]
            pairs = [spatial_gate(tokens, reference.expand(tokens.shape[0], -1, -1)) for reference in references.split(1)]
            gates = torch.stack([gate for gate, _ in pairs], dim=1)  # (B, R, N, 1)
            self.gates[block] = (gates, torch.stack([score for _, score in pairs], dim=1))  # and scores (B, R)


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
        self.block = block_of(name)
        # The layer's own processor: when this one neither records nor injects, the layer is bit-for-bit itself.
        self.fallback = fallback

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        controller = self.controller
        batched = controller.mode == "batched"
        injecting = controller.config.gate_scale != 0 and self.block in controller.gates
        injecting = injecting and (batched or (controller.mode == "inject" and self.name in controller.recorded))
        if self.fallback is not None and controller.mode not in ("record", "batched") and not injecting:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if hidden_states.ndim != 3 or encoder_hidden_states is not None:
            raise ValueError(f"{self.name}: ReFIR injection is for self-attention over (B, N, C) tokens")
        query = _heads(attn.to_q(hidden_states), attn.heads)
        key = _heads(attn.to_k(hidden_states), attn.heads)
        value = _heads(attn.to_v(hidden_states), attn.heads)
        intra = _merge(F.scaled_dot_product_attention(query, key, value))
        output = intra
        if controller.mode == "record":
            controller.recorded[self.name] = (key, value)
        elif batched:
            split = controller.split
            controller.recorded[self.name] = (key[split:], value[split:])
            if injecting:
                target = self._inject(query[:split], intra[:split], key[split:], value[split:])
                output = torch.cat([target, intra[split:]])
        elif injecting:
            output = self._inject(query, intra, *controller.recorded[self.name])
        output = attn.to_out[0](output)
        return attn.to_out[1](output)

    def _inject(self, query: torch.Tensor, intra: torch.Tensor, ref_keys: torch.Tensor, ref_values: torch.Tensor) -> torch.Tensor:
        controller = self.controller
        gates, scores = controller.gates[self.block]  # (B, R, N, 1), (B, R): shared across the transformer's depth
        batch = query.shape[0]
        inters = [
            _merge(F.scaled_dot_product_attention(query, k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)))
            for k, v in zip(ref_keys.split(1), ref_values.split(1), strict=True)
        ]
        usable = scores >= controller.config.similarity_threshold
        # A cosine is never below -1: at the default threshold every reference is usable, and the check (a device-to-host
        # sync per injected layer and step; impossible under `restoray plan`'s fake tensors) is skipped.
        if controller.config.similarity_threshold > -1.0 and not usable.any():
            return intra
        weights = scores.masked_fill(~usable, float("-inf")).softmax(dim=1).nan_to_num(0.0)  # (B, R)
        inter = sum(w[:, None, None] * o for w, o in zip(weights.unbind(1), inters, strict=True))
        gate = (weights[:, :, None, None] * gates).sum(dim=1) * usable.any(dim=1).to(gates.dtype)[:, None, None]
        scale = controller.config.gate_scale
        # The blend and AdaIN in fp32 (token statistics); back to the layer's dtype for its output projection.
        blended = (1 - scale * gate) * intra.float() + scale * gate * inter.float()
        return adain(blended, intra.float()).to(intra.dtype)


def decoder_self_attention_layers(unet) -> list[str]:
    """Names of the UNet decoder's self-attention modules (attn1 of the up blocks' transformer blocks)."""
    return [name for name, _ in unet.attn_processors.items() if name.startswith("up_blocks") and ".attn1." in name]


def install(model, controller: ReferenceController, layer_filter: Callable[[str], bool] | None = None) -> list[str]:
    """Put ReFIR processors on the chosen decoder self-attention layers of `model.unet` (all by default) and the
    controller as the model's block observer; returns the layers' names."""
    unet = model.unet
    chosen = [name for name in decoder_self_attention_layers(unet) if layer_filter is None or layer_filter(name)]
    processors = dict(unet.attn_processors)
    for name in chosen:
        processors[name] = ReferenceAttnProcessor(controller, name, fallback=processors[name])
    unet.set_attn_processor(processors)
    model.block_observer = controller
    return chosen


def uninstall(model, processors: dict) -> None:
    model.unet.set_attn_processor(dict(processors))  # a copy: diffusers empties the dict it is given
    model.block_observer = None
