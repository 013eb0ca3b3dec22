"""Measure networks at real size without weights or memory: parameters, FLOPs and peak memory under FakeTensorMode.

    mode = FakeTensorMode()
    unet = fake_module(lambda: UNet2DConditionModel(**config), torch.bfloat16, mode)
    parameter_stats(unet)                                  # count, bytes, trainable
    measure(lambda: unet(...inputs made inside...), [unet], mode=mode)   # flops, peak_bytes, by_category

Facts this relies on (torch 2.14):
- Fake parameters cannot be cast (`.to(dtype)` fails to swap them), so modules are built in their dtype by setting the
  default dtype while they are built; an optimizer's state then comes out in that dtype too.
- Every module measured together shares one FakeTensorMode; `copy.deepcopy` of a fake module needs FakeCopyMode
  (the adaptor and the robust encoder are copies of UNet and VAE parts).
- On CPU, SDPA dispatches to `aten._scaled_dot_product_flash_attention_for_cpu(_backward)`, which FlopCounterMode
  counts as 0: both are registered here with torch's own SDPA formulas (the same argument order as the CUDA ops).
- MemTracker registers a gradient hook on every parameter of a module it meets, which a frozen parameter refuses:
  `_Tracker` marks frozen ones as hooked already.
- Fake tensors have no values: code that branches on one (`if tensor.any()`) cannot run under the mode.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle

for _name, _formula in (
    ("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", flop_counter.sdpa_backward_flop),
):
    _op = getattr(torch.ops.aten, _name, None)
    if _op is not None and _op not in flop_counter.flop_registry:
        # sdpa_flop and sdpa_backward_flop are already shape-wrapped (register_flop_formula would wrap them again).
        flop_counter.flop_registry[_op] = _formula


def fake_module(factory: Callable[[], nn.Module], dtype: torch.dtype, mode: FakeTensorMode) -> nn.Module:
    """`factory()` built with fake parameters in `dtype`: no memory is allocated, random init runs on fake tensors."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with mode, FakeCopyMode(mode):
            return factory()
    finally:
        torch.set_default_dtype(previous)


@dataclass(frozen=True)
class ParameterStats:
    count: int
    bytes: int
    trainable: int
    trainable_bytes: int

    def __add__(self, other: ParameterStats) -> ParameterStats:
        return ParameterStats(
            self.count + other.count,
            self.bytes + other.bytes,
            self.trainable + other.trainable,
            self.trainable_bytes + other.trainable_bytes,
        )


def parameter_stats(module: nn.Module, trainable: Iterable[nn.Parameter] | None = None) -> ParameterStats:
    """Parameters of a module (shared ones once) and, of them, the trainable ones (requires_grad, or `trainable`)."""
    parameters = list(module.parameters())
    chosen = {id(p) for p in trainable} if trainable is not None else {id(p) for p in parameters if p.requires_grad}
    trained = [p for p in parameters if id(p) in chosen]
    return ParameterStats(
        sum(p.numel() for p in parameters),
        sum(p.numel() * p.element_size() for p in parameters),
        sum(p.numel() for p in trained),
        sum(p.numel() * p.element_size() for p in trained),
    )


class _Tracker(MemTracker):
    """MemTracker that tolerates frozen parameters (see the module docstring) and keeps only the global peak: its own
    `_update_peak_stats` also walks every module seen so far on every op, to keep per-module peaks the plan does not
    read (about 30 s of a tiny training step's 35 s)."""

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                self._peak_mem[device] = snapshot[_TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snapshot)

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        for parameter in module.parameters():
            if not parameter.requires_grad and self._param_to_grad_hook_handles.get(parameter) is None:
                # Handles of hooks never registered: their remove() finds nothing to remove.
                self._param_to_grad_hook_handles[parameter] = (RemovableHandle(OrderedDict()), RemovableHandle(OrderedDict()))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)


# MemTracker's reference types -> ours (buffers and backward temporaries count as "other").
CATEGORIES = {
    "Parameter": "parameters",
    "Buffer": "other",
    "Gradient": "gradients",
    "Activation": "activations",
    "Temp": "other",
    "Optstate": "optimizer_state",
    "Other": "other",
}


@dataclass
class Measurement:
    flops: int
    peak_bytes: int
    by_category: dict[str, int] = field(default_factory=dict)  # at the peak
    seconds: float = 0.0

    @property
    def activation_bytes(self) -> int:
        return self.by_category.get("activations", 0) + self.by_category.get("other", 0)


def measure(
    fn: Callable[[], object],
    modules: Iterable[nn.Module],
    mode: FakeTensorMode,
    optimizer: torch.optim.Optimizer | None = None,
) -> Measurement:
    """Run `fn()` under `mode` twice: MemTracker's peak by category, then FLOPs (attention included; backward too
    when fn runs it). Apart, because with both active the activations that checkpointing recomputes stay alive after
    backward and inflate the peak. `modules` (and `optimizer`) are registered first, so their parameters (and state)
    count from the start; tensors `fn` makes count as activations."""
    started = time.perf_counter()
    tracker = _Tracker()
    counter = FlopCounterMode(display=False)
    with mode:
        tracker.track_external(*modules, *([optimizer] if optimizer is not None else []))
        with tracker:
            fn()
        with counter:
            fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    raw = {str(getattr(key, "value", key)): value for device in snapshot.values() for key, value in device.items()}
    by_category = dict.fromkeys(dict.fromkeys(CATEGORIES.values()), 0)
    for key, value in raw.items():
        if key in CATEGORIES:
            by_category[CATEGORIES[key]] += value
    return Measurement(int(counter.get_total_flops()), int(raw.get("Total", 0)), by_category, time.perf_counter() - started)
