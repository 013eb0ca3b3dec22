import pytest
import torch

from restoration.models.adaptor import AdaptedUNet, AdaptorConfig
from restoration.models.base import encode_prompt, load_sdxl, size_crop_time_ids
from restoration.models.presets import load_preset


@pytest.fixture(scope="module")
def tiny():
    networks = load_sdxl(load_preset("tiny")).frozen()
    semantic, pooled = encode_prompt(networks, ["a photo of a cat"])
    restoration, restoration_pooled = encode_prompt(networks, ["Deblur with sigma 2.0; Denoise with sigma 0.06"])
    time_ids = size_crop_time_ids((64, 64), (0, 0), (64, 64), batch=1)
    return {
        "networks": networks,
        "semantic": semantic,
        "added": {"text_embeds": pooled, "time_ids": time_ids},
        "restoration": restoration,
        "restoration_added": {"text_embeds": restoration_pooled, "time_ids": time_ids},
    }


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([500]), torch.randn(1, 4, 16, 16, generator=generator)


@pytest.mark.parametrize("connector", ["zero_sft", "modulation"])
def test_control_scale_zero_is_the_frozen_unet_exactly(tiny, connector):
    unet = tiny["networks"].unet
    adapted = AdaptedUNet(unet, AdaptorConfig(connector=connector, connector_hidden=8, norm_groups=8))
    x, t, lq = _inputs()
    with torch.no_grad():
        reference = unet(x, t, encoder_hidden_states=tiny["semantic"], added_cond_kwargs=tiny["added"]).sample
        off = adapted(x, t, tiny["semantic"], tiny["added"], control_scale=0.0)
        on = adapted(x, t, tiny["semantic"], tiny["added"], lq, tiny["restoration"], tiny["restoration_added"], control_scale=1.0)
    assert torch.equal(off, reference)
    if connector == "modulation":
        assert torch.allclose(on, reference, atol=1e-5)  # modulation fusion is the identity at initialisation
    else:
        assert on.shape == reference.shape and not torch.allclose(on, reference)  # ZeroSFT normalises at full scale


def test_adaptor_is_trimmed_initialised_from_the_unet_and_alone_trainable(tiny):
    unet = tiny["networks"].unet
    adapted = AdaptedUNet(unet, AdaptorConfig(connector_hidden=8, norm_groups=8))
    full = [
        max((len(a.transformer_blocks) for a in getattr(b, "attentions", []) or []), default=0) for b in [*unet.down_blocks, unet.mid_block]
    ]
    assert adapted.adaptor.transformer_depth == [(d + 1) // 2 for d in full]
    assert torch.equal(adapted.adaptor.conv_in.weight, unet.conv_in.weight)
    assert adapted.adaptor.lq_conv_in.weight.abs().sum() == 0
    kept = AdaptedUNet(unet, AdaptorConfig(transformer_depth=full, connector_hidden=8, norm_groups=8))
    assert kept.adaptor.transformer_depth == full
    with pytest.raises(ValueError, match="entries"):
        AdaptedUNet(unet, AdaptorConfig(transformer_depth=[1]))

    x, t, lq = _inputs()
    out = adapted(x, t, tiny["semantic"], tiny["added"], lq, tiny["restoration"], tiny["restoration_added"])
    out.square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    # As in ControlNet, the zero convolutions get gradients first; the adaptor behind them only once they moved.
    assert all(connector.gamma.weight.grad.abs().sum() > 0 for block in adapted.connectors for connector in block)
    assert adapted.adaptor.lq_conv_in.weight.grad.abs().sum() == 0
    with torch.no_grad():
        for block in adapted.connectors:
            for connector in block:
                connector.skip_add.weight.normal_(0, 0.01)
    adapted.zero_grad()
    adapted(x, t, tiny["semantic"], tiny["added"], lq, tiny["restoration"], tiny["restoration_added"]).square().mean().backward()
    assert adapted.adaptor.lq_conv_in.weight.grad.abs().sum() > 0  # the LQ latent now steers the output


def test_supir_v0_layout_at_tiny_width(tiny):
    """The `supir-v0` preset's adaptor config on the tiny UNet has SUPIR_v0's module layout (SUPIR/modules/SUPIR_v0.py,
    LightGLVUNet + GLVControl): full-depth control trunk; one ZeroSFT per skip (control width -> skip width, affine norm,
    128 hidden) and one on the middle block (no skip); a ZeroCrossAttn with 64-dim heads before each upsampler; in
    SUPIR's processing order: mid, then per output block its ZeroSFT and, where it upsamples, the ZeroCrossAttn."""
    from restoration.models.connectors import ZeroCrossAttn, ZeroSFT

    unet = tiny["networks"].unet
    adapted = AdaptedUNet(unet, AdaptorConfig.model_validate(load_preset("supir-v0").adaptor))
    full = [
        max((len(a.transformer_blocks) for a in getattr(b, "attentions", []) or []), default=0) for b in [*unet.down_blocks, unet.mid_block]
    ]
    assert adapted.adaptor.transformer_depth == full

    # SUPIR_v0's channel bookkeeping, from the UNet: controls = every input-block output, then the middle block.
    skips = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        skips += [r.out_channels for r in block.resnets] + ([block.downsamplers[0].out_channels] if block.downsamplers else [])
    mid = unet.mid_block.resnets[-1].out_channels
    expected = [("sft", mid, mid, 0)]  # (kind, control width, skip width, decoder width)
    decoder = mid
    stack = list(skips)
    for block in unet.up_blocks:
        for resnet in block.resnets:
            skip = stack.pop()
            expected.append(("sft", skip, skip, decoder))
            decoder = resnet.out_channels
        if block.upsamplers is not None:
            expected.append(("xattn", skip, None, decoder))
    assert len(skips) + 1 == 10 and sum(kind == "xattn" for kind, *_ in expected) == 2  # as SUPIR_v0 on SDXL

    ours = [adapted.mid_connector]
    for index, block in enumerate(adapted.connectors):
        ours.extend(block)
        if str(index) in adapted.cross_attentions:
            ours.append(adapted.cross_attentions[str(index)])
    assert len(ours) == len(expected) == 12
    for module, (kind, control, skip, decoder) in zip(ours, expected, strict=True):
        if kind == "sft":
            assert isinstance(module, ZeroSFT)
            assert module.skip_add.in_channels == control and module.skip_add.out_channels == skip
            assert module.gamma.out_channels == decoder + skip and module.shared[0].out_channels == 128
            assert module.norm.affine
        else:
            assert isinstance(module, ZeroCrossAttn)
            assert module.to_q.in_features == decoder and module.to_k.in_features == control
            assert module.heads == max(1, decoder // 64)


def test_own_embeddings_start_as_the_unets_and_then_are_the_adaptors_own(tiny):
    """SUPIR_v0's GLVControl has its own time_embed and label_emb: copies at initialisation, then its own weights."""
    unet = tiny["networks"].unet
    with torch.random.fork_rng():
        torch.manual_seed(0)
        shared = AdaptedUNet(unet, AdaptorConfig(mid_connector=False)).eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        own = AdaptedUNet(unet, AdaptorConfig(mid_connector=False, own_embeddings=True)).eval()
    assert (
        "adaptor.time_embedding.linear_1.weight" in own.state_dict() and "adaptor.time_embedding.linear_1.weight" not in shared.state_dict()
    )
    x, t, lq = _inputs()
    with torch.no_grad():
        for model in (shared, own):  # at zero init the connectors hide the adaptor: give them weights
            for block in model.connectors:
                for connector in block:
                    connector.gamma.weight.copy_(
                        torch.linspace(-0.05, 0.05, connector.gamma.weight.numel()).view_as(connector.gamma.weight)
                    )

        def run(model):
            return model(x, t, tiny["semantic"], tiny["added"], lq, tiny["restoration"], tiny["restoration_added"])

        assert torch.allclose(run(shared), run(own), atol=1e-6)
        unet_bias = unet.time_embedding.linear_2.bias.clone()
        own.adaptor.time_embedding.linear_2.bias.add_(0.5)
        assert not torch.allclose(run(shared), run(own), atol=1e-4)
        assert torch.equal(unet.time_embedding.linear_2.bias, unet_bias)  # a copy: the frozen UNet's embedding is untouched
