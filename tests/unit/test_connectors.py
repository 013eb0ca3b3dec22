import pytest
import torch

from restoration.models.connectors import ModulationFusion, ZeroCrossAttn, ZeroSFT


@pytest.fixture
def features():
    generator = torch.Generator().manual_seed(0)
    h_dec = torch.randn(2, 32, 8, 8, generator=generator)
    h_skip = torch.randn(2, 16, 8, 8, generator=generator)
    control = torch.randn(2, 24, 8, 8, generator=generator)
    return h_dec, h_skip, control


def test_zero_sft_scale_zero_is_the_plain_concatenation_and_blends_linearly(features):
    h_dec, h_skip, control = features
    torch.manual_seed(0)
    sft = ZeroSFT(24, 32, 16, hidden_channels=8, norm_groups=8)
    h_raw = torch.cat([h_dec, h_skip], 1)
    assert torch.equal(sft(h_dec, h_skip, control, scale=0.0), h_raw)
    # At initialisation the modulation is zero: the full-scale output is the parameter-free GroupNorm of h_raw.
    full = sft(h_dec, h_skip, control, scale=1.0)
    assert torch.allclose(full, torch.nn.functional.group_norm(h_raw, 8), atol=1e-5)
    half = sft(h_dec, h_skip, control, scale=0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * h_raw, atol=1e-6)
    # The zero convolutions receive gradients, so training moves them off zero.
    full.square().mean().backward()
    assert sft.gamma.weight.grad.abs().sum() > 0 and sft.beta.weight.grad.abs().sum() > 0


def test_zero_sft_learns_to_use_the_control(features):
    h_dec, h_skip, control = features
    sft = ZeroSFT(24, 32, 16, hidden_channels=8, norm_groups=8)
    with torch.no_grad():
        for conv in (sft.skip_add, sft.gamma, sft.beta):
            conv.weight.normal_(0, 0.1)
    other = torch.randn_like(control)
    assert not torch.allclose(sft(h_dec, h_skip, control), sft(h_dec, h_skip, other))


def test_modulation_fusion_is_the_identity_at_initialisation(features):
    h_dec, h_skip, control = features
    fusion = ModulationFusion(24, 16)
    assert torch.equal(fusion(h_dec, h_skip, control), torch.cat([h_dec, h_skip], 1))
    with torch.no_grad():
        fusion.gamma.bias.fill_(1.0)  # gamma = 1 doubles the skip
    assert torch.allclose(fusion(h_dec, h_skip, control)[:, 32:], 2 * h_skip)


def test_zero_cross_attention_starts_as_the_identity(features):
    h_dec, _, control = features
    attention = ZeroCrossAttn(32, 24, heads=4, norm_groups=8)
    assert torch.equal(attention(h_dec, control), h_dec)
    with torch.no_grad():
        attention.to_out.weight.normal_(0, 0.1)
    changed = attention(h_dec, control)
    assert changed.shape == h_dec.shape and not torch.allclose(changed, h_dec)
    assert torch.equal(attention(h_dec, control, scale=0.0), h_dec)
    with pytest.raises(ValueError, match="heads"):
        ZeroCrossAttn(30, 24, heads=4)
