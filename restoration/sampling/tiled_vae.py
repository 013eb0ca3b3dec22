"""Tiled VAE with image-wide statistics: encode and decode images larger than memory allows, tile by tile.

Cutting the input into tiles and running the VAE on each is not enough: the VAE's GroupNorm layers and its middle
self-attention see the whole image when run untiled, and per-tile statistics give visible seams and colour shifts
(on the random tiny VAE a naive 2x2 decode is ~14 dB from the untiled one). Here every tile runs the unchanged
diffusers forward in its own thread, and the layers that need the whole image meet at a barrier:

- GroupNorm: each tile adds the sums of its *core* (the part of the tile it owns; cores partition the image)
  to a shared accumulator, waits, then normalises with the image-wide mean and variance;
- the middle self-attention: each tile contributes the keys and values of its core tokens, waits, then attends to
  all of them (exact global attention, as untiled).

What remains tile-local is the zero padding of the convolutions at the tile borders; the tiles overlap by `overlap`
and each contributes only its core to the output, so the border effects fall outside the cores. The cost is that
all tiles' activations of one layer are alive at once (as in SUPIR's VAEHook, which keeps every tile's
intermediates); the peak of a single convolution's working memory is the tile's, not the image's.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from restoration.sampling.tiling import tile_starts


@dataclass
class _Barrier:
    """Shared state of one tiled call: accumulators keyed by the layer call's order, identical in every tile."""

    parties: int
    barrier: threading.Barrier = field(init=False)
    lock: threading.Lock = field(default_factory=threading.Lock)
    slots: dict[int, list] = field(default_factory=dict)

    def __post_init__(self):
        self.barrier = threading.Barrier(self.parties)

    def exchange(self, call: int, tile: int, value):
        """Every tile hands in its value for layer call `call`; all get back the list ordered by tile."""
        with self.lock:
            self.slots.setdefault(call, [None] * self.parties)[tile] = value
        self.barrier.wait()
        return self.slots[call]


@dataclass
class _TileContext:
    shared: _Barrier
    index: int
    in_size: tuple[int, int]  # the tile's input (h, w)
    core: tuple[int, int, int, int]  # owned rows/cols in input coordinates, relative to the tile: y0, y1, x0, x1
    calls: int = 0

    def core_slices(self, height: int, width: int) -> tuple[slice, slice]:
        """The core at a layer whose feature map is (height, width): the input core scaled by the layer's factor."""
        fy, fx = height / self.in_size[0], width / self.in_size[1]
        y0, y1, x0, x1 = self.core
        return slice(round(y0 * fy), round(y1 * fy)), slice(round(x0 * fx), round(x1 * fx))

    def next_call(self) -> int:
        self.calls += 1
        return self.calls


_local = threading.local()


def _context() -> _TileContext | None:
    return getattr(_local, "context", None)


def _synced_group_norm(norm: nn.GroupNorm, x: torch.Tensor, context: _TileContext) -> torch.Tensor:
    batch, channels = x.shape[:2]
    rows, cols = context.core_slices(x.shape[2], x.shape[3])
    core = x[:, :, rows, cols].double().reshape(batch, norm.num_groups, -1)
    partial = torch.stack([core.sum(-1), (core * core).sum(-1), torch.full_like(core[..., 0], core.shape[-1])])
    total = sum(context.shared.exchange(context.next_call(), context.index, partial))
    mean = total[0] / total[2]
    var = (total[1] / total[2] - mean * mean).clamp_min(0)
    grouped = x.reshape(batch, norm.num_groups, -1)
    normed = ((grouped - mean[..., None].to(x.dtype)) * torch.rsqrt(var[..., None] + norm.eps).to(x.dtype)).reshape_as(x)
    if norm.affine:
        normed = normed * norm.weight.view(1, channels, 1, 1) + norm.bias.view(1, channels, 1, 1)
    return normed


class _SyncedGroupNorm(nn.Module):
    """Wraps a GroupNorm: image-wide statistics inside a tiled call, the plain layer outside one."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = _context()
        if context is None or x.ndim != 4:
            return self.norm(x)
        return _synced_group_norm(self.norm, x, context)


class _SyncedAttnProcessor:
    """The VAE middle block's self-attention with keys and values gathered from every tile's core."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        context = _context()
        if context is None or hidden_states.ndim != 4 or encoder_hidden_states is not None or attention_mask is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        x = attn.group_norm(hidden_states) if attn.group_norm is not None else hidden_states
        tokens = x.reshape(batch, channels, height * width).transpose(1, 2)
        rows, cols = context.core_slices(height, width)
        core = x[:, :, rows, cols].reshape(batch, channels, -1).transpose(1, 2)
        key_value = (attn.to_k(core), attn.to_v(core))
        gathered = context.shared.exchange(context.next_call(), context.index, key_value)
        key = torch.cat([k for k, _ in gathered], dim=1)
        value = torch.cat([v for _, v in gathered], dim=1)
        query = attn.to_q(tokens)
        head_dim = query.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _cores(size: int, tile: int, starts: list[int], align: int) -> list[tuple[int, int]]:
    """Owned ranges (absolute) splitting each overlap near its middle (on a multiple of `align`), so that the cores
    partition [0, size)."""
    bounds = [0]
    for previous, current in itertools.pairwise(starts):
        bounds.append((current + min(previous + tile, size)) // 2 // align * align)
    bounds.append(size)
    return list(itertools.pairwise(bounds))


def _install(module: nn.Module) -> list[Callable[[], None]]:
    """Swap in the synced layers (reversibly); returns the undo actions."""
    undo: list[Callable[[], None]] = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, _SyncedGroupNorm(child))
                undo.append(lambda parent=parent, name=name, child=child: setattr(parent, name, child))
        processor = getattr(parent, "processor", None)
        if processor is not None and hasattr(parent, "set_processor") and getattr(parent, "group_norm", None) is not None:
            parent.processor = _SyncedAttnProcessor(processor)
            undo.append(lambda parent=parent, processor=processor: setattr(parent, "processor", processor))
    return undo


@torch.no_grad()
def tiled_vae_call(
    module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, align: int = 1
) -> torch.Tensor:
    """Run `fn` (the VAE's encode or decode, which uses `module`'s layers) on overlapping tiles of x with image-wide
    GroupNorm statistics and attention, and assemble the tiles' cores. `fn` may scale the spatial size by a constant
    factor (x8 for decode, /8 for encode); when it downsamples, `align` (the factor) keeps the cores on its grid.
    Inputs no larger than `tile` run untiled."""
    _, _, height, width = x.shape
    if tile >= height and tile >= width:
        return fn(x)
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    tile_h, tile_w = min(tile, height), min(tile, width)
    row_cores, col_cores = _cores(height, tile_h, rows, align), _cores(width, tile_w, cols, align)
    boxes = [
        (top, left, row_core, col_core)
        for top, row_core in zip(rows, row_cores, strict=True)
        for left, col_core in zip(cols, col_cores, strict=True)
    ]
    shared = _Barrier(len(boxes))
    results: list[torch.Tensor | None] = [None] * len(boxes)
    errors: list[BaseException] = []

    def run(index: int, top: int, left: int, row_core, col_core):
        core = (row_core[0] - top, row_core[1] - top, col_core[0] - left, col_core[1] - left)
        _local.context = _TileContext(shared, index, (tile_h, tile_w), core)
        try:
            with torch.no_grad():
                results[index] = fn(x[:, :, top : top + tile_h, left : left + tile_w])
        except threading.BrokenBarrierError:
            pass  # another tile failed first; its error is the one reported
        except BaseException as error:  # re-raised on the caller's thread below
            errors.append(error)
            shared.barrier.abort()
        finally:
            _local.context = None

    undo = _install(module)
    try:
        threads = [threading.Thread(target=run, args=(index, *box), name=f"tiled-vae-{index}") for index, box in enumerate(boxes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for action in reversed(undo):
            action()
    if errors:
        raise errors[0]
    first = results[0]
    factor = first.shape[-1] / tile_w
    out = first.new_empty(first.shape[0], first.shape[1], round(height * factor), round(width * factor))
    for (top, left, (y0, y1), (x0, x1)), result in zip(boxes, results, strict=True):
        out[:, :, round(y0 * factor) : round(y1 * factor), round(x0 * factor) : round(x1 * factor)] = result[
            :, :, round((y0 - top) * factor) : round((y1 - top) * factor), round((x0 - left) * factor) : round((x1 - left) * factor)
        ]
    return out


def tiled_decode(vae, latent: torch.Tensor, tile_latent: int, overlap: int) -> torch.Tensor:
    """`vae.decode(latent).sample`, tiled over latent tiles of `tile_latent` with `overlap` latent pixels."""
    return tiled_vae_call(vae.decoder, lambda z: vae.decode(z).sample, latent, tile_latent, overlap)


def tiled_encode(
    encode: Callable[[torch.Tensor], torch.Tensor], encoder: nn.Module, image: torch.Tensor, tile: int, overlap: int, factor: int = 8
) -> torch.Tensor:
    """`encode(image)` (pixels -> latent, e.g. the robust encoder's mean) tiled over `tile`-pixel tiles; tile and
    overlap are rounded to multiples of the VAE's downsampling factor so that every tile's latent grid is aligned."""
    tile = max(factor, tile // factor * factor)
    overlap = min(overlap, tile // 2) // factor * factor
    if image.shape[2] % factor or image.shape[3] % factor:
        raise ValueError(f"image size {tuple(image.shape[2:])} is not a multiple of {factor}")
    return tiled_vae_call(encoder, encode, image, tile, overlap, align=factor)
