"""Tiled processing for images larger than the model size: Gaussian-weighted overlapping tiles.

`tiled(fn, x, tile, overlap)` applies `fn` to overlapping spatial tiles of x (B, C, H, W) and blends the outputs
with Gaussian weights normalised to sum to 1 at every position, so seams disappear and a constant `fn` output is
reproduced exactly. `fn` may change the spatial scale by an integer factor (the VAE: latent <-> pixels x8).
Used for the denoiser inside the sampler (tiled diffusion, as SUPIR does). Not for the VAE: its GroupNorm and
middle self-attention must see the whole image, which `tiled_vae.py` arranges.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


# SUPIR's tiled sampler (`_gaussian_weights`, var = 0.01): sigma is a tenth of the tile's side, so a tile's centre
# dominates and its borders hardly count.
TILE_SIGMA = 0.1


def gaussian_weights(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H, W) weights peaking at the tile centre, sigma = TILE_SIGMA x the side, as SUPIR's: its horizontal centre is
    (W - 1) / 2, the middle pixel, and its vertical one H / 2, half a pixel below the middle. The asymmetry is
    upstream's (mixture-of-diffusers' `_gaussian_weights`, which SUPIR took); it is kept so tiled restorations equal
    SUPIR's (weights up to 0.024 of the peak apart from a centred window on a 64-latent tile)."""

    def axis(n: int, centre: float) -> torch.Tensor:
        positions = torch.arange(n, device=device, dtype=torch.float64)
        return torch.exp(-0.5 * ((positions - centre) / max(n * TILE_SIGMA, 1e-6)) ** 2)

    return (axis(height, height / 2)[:, None] * axis(width, (width - 1) / 2)[None, :]).to(dtype)


def tile_weight_sum(height: int, width: int, tile: int, overlap: int) -> torch.Tensor:
    """The normalised weight coverage (should be 1 everywhere); exposed for tests and debugging."""
    total = torch.zeros(height, width, dtype=torch.float64)
    tile_h, tile_w = min(tile, height), min(tile, width)
    weights = gaussian_weights(tile_h, tile_w, dtype=torch.float64)
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            total[top : top + tile_h, left : left + tile_w] += weights
    coverage = torch.zeros_like(total)
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            coverage[top : top + tile_h, left : left + tile_w] += weights / total[top : top + tile_h, left : left + tile_w]
    return coverage


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """Apply `fn` tile by tile and blend; fn may change the spatial size by a constant factor (read off its output)."""
    _, _, height, width = x.shape
    if tile >= height and tile >= width:
        return fn(x)
    tile_h, tile_w = min(tile, height), min(tile, width)
    out = total = None
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            result = fn(x[:, :, top : top + tile_h, left : left + tile_w])
            if out is None:
                factor = result.shape[-1] / tile_w
                out = result.new_zeros(result.shape[0], result.shape[1], round(height * factor), round(width * factor))
                total = result.new_zeros(1, 1, out.shape[2], out.shape[3])
                weights = gaussian_weights(result.shape[2], result.shape[3], result.device, result.dtype)[None, None]
            out_top, out_left = round(top * factor), round(left * factor)
            out[:, :, out_top : out_top + result.shape[2], out_left : out_left + result.shape[3]] += result * weights
            total[:, :, out_top : out_top + result.shape[2], out_left : out_left + result.shape[3]] += weights
    return out / total
