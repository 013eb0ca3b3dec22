import torch

from restoration.sampling.colorfix import adain_color_fix, low_frequency, wavelet_color_fix
from restoration.sampling.tiling import tile_starts, tile_weight_sum, tiled


def test_tile_weights_sum_to_one_everywhere():
    assert tile_starts(100, 40, 10) == [0, 30, 60]
    coverage = tile_weight_sum(100, 72, tile=40, overlap=12)
    assert torch.allclose(coverage, torch.ones_like(coverage), atol=1e-9)
    constant = torch.full((1, 3, 50, 70), 0.25)
    assert torch.allclose(tiled(lambda t: t * 2, constant, tile=32, overlap=8), constant * 2, atol=1e-6)


def test_tiled_function_blends_overlapping_tiles():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 40, 56, generator=generator)
    # A per-pixel function is reproduced exactly; a scale change (like the VAE's x8) lands on the right grid.
    assert torch.allclose(tiled(lambda t: t.sin(), x, tile=16, overlap=6), x.sin(), atol=1e-6)
    upscaled = tiled(lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest"), x, tile=16, overlap=8)
    assert torch.allclose(upscaled, torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"), atol=1e-6)


def test_colour_fixes_take_the_references_colours():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=generator)
    reference = torch.rand(1, 3, 64, 64, generator=generator) * 0.3 + 0.6
    fixed = adain_color_fix(image, reference)
    assert torch.allclose(fixed.mean(dim=(2, 3)), reference.mean(dim=(2, 3)), atol=1e-5)
    wavelet = wavelet_color_fix(image, reference)
    assert torch.allclose(low_frequency(wavelet), low_frequency(reference), atol=0.05)
    assert torch.allclose(wavelet - low_frequency(wavelet), image - low_frequency(image), atol=0.05)
