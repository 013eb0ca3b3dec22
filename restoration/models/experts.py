"""ABAIR's LoRA experts: one low-rank adapter per degradation type on the adaptor, blended by the estimator.

Experts are peft LoRA adapters injected into the adaptor's attention projections, named after the degradation
type they were trained on (`single` samples of that type, base frozen). Adding an expert injects a new adapter
and touches no other adapter's weights, which is how ABAIR adds a degradation: train one adapter (and the
estimator's new output). Blending sets every listed adapter active with its LoRA scaling multiplied by its
weight, so the adapted layer computes W x + sum_i w_i * s * B_i A_i x: one-hot weights are exactly that expert
alone, soft weights the estimator's mixture. Weights apply to the whole batch (restore one image per call).
"""

from __future__ import annotations

import warnings

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def add_expert(
    model: nn.Module, name: str, rank: int = 4, alpha: int | None = None, targets: tuple[str, ...] = DEFAULT_TARGETS
) -> nn.Module:
    """Inject a LoRA adapter called `name` (a degradation type name) into `model`'s attention projections."""
    if any(name in layer.lora_A for layer in _lora_layers(model)):
        raise ValueError(f"expert {name!r} already exists")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights=True)
    with warnings.catch_warnings():
        # peft warns on every adapter after the first; several adapters in one model is exactly ABAIR's design.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)
    return model


def expert_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for layer in _lora_layers(model):
        names.extend(n for n in layer.lora_A if n not in names)
    return names


def set_expert_weights(model: nn.Module, weights: dict[str, float]) -> None:
    """Activate the named experts with these blending weights (one-hot: that expert alone)."""
    unknown = set(weights) - set(expert_names(model))
    if unknown:
        raise KeyError(f"unknown experts {sorted(unknown)}; known: {', '.join(expert_names(model))}")
    active = [name for name, weight in weights.items() if weight != 0]
    for layer in _lora_layers(model):
        present = [name for name in active if name in layer.lora_A]
        layer.set_adapter(present or list(layer.lora_A)[:1])
        for name in layer.lora_A:
            # set_scale sets alpha / r times the weight (scale_layer would multiply the current scale: it compounds).
            layer.set_scale(name, weights.get(name, 0.0))


def train_only(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Freeze everything but expert `name`'s LoRA weights; returns them (for the optimizer)."""
    model.requires_grad_(False)
    parameters = []
    for layer in _lora_layers(model):
        if name in layer.lora_A:
            for module in (layer.lora_A[name], layer.lora_B[name]):
                module.requires_grad_(True)
                parameters.extend(module.parameters())
    return parameters
