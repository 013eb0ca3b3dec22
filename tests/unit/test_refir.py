import pytest
import torch

from restoration.models.base import encode_prompt, load_sdxl, size_crop_time_ids
from restoration.models.presets import load_preset
from restoration.retrieval.injection import InjectionConfig, ReferenceController, adain, install, spatial_gate


@pytest.fixture(scope="module")
def tiny():
    networks = load_sdxl(load_preset("tiny")).frozen()
    embeds, pooled = encode_prompt(networks, ["a photo"])
    added = {"text_embeds": pooled, "time_ids": size_crop_time_ids((64, 64), (0, 0), (64, 64), batch=1)}
    return networks.unet, embeds, added


def _run(unet, x, embeds, added):
    with torch.no_grad():
        return unet(x, torch.tensor([300]), encoder_hidden_states=embeds, added_cond_kwargs=added).sample


def test_gate_zero_is_no_reference_and_an_identical_reference_changes_little(tiny):
    unet, embeds, added = tiny
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(1, 4, 16, 16, generator=generator)
    reference = torch.randn(1, 4, 16, 16, generator=generator)
    plain = _run(unet, target, embeds, added)
    controller = ReferenceController(InjectionConfig(gate_scale=0.0))
    layers = install(unet, controller)
    assert layers and all(name.startswith("up_blocks") and ".attn1." in name for name in layers)
    try:
        controller.mode = "record"
        _run(unet, reference, embeds, added)
        controller.mode = "inject"
        assert torch.allclose(_run(unet, target, embeds, added), plain, atol=1e-5)  # gate scale 0 == no reference

        controller.config.gate_scale = 1.0
        injected = _run(unet, target, embeds, added)
        assert not torch.allclose(injected, plain, atol=1e-4)  # a different reference does change the output

        controller.clear()
        controller.mode = "record"
        _run(unet, target, embeds, added)
        controller.mode = "inject"
        assert torch.allclose(_run(unet, target, embeds, added), plain, atol=1e-4)  # the target as its own reference

        controller.config.similarity_threshold = 2.0  # no reference is similar enough: plain attention
        assert torch.allclose(_run(unet, target, embeds, added), plain, atol=1e-5)
    finally:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def test_gate_and_adain():
    features = torch.randn(2, 10, 8)
    gate, score = spatial_gate(features, features[:, :4])
    assert gate.shape == (2, 10, 1) and gate.min() == 0 and gate.max() == pytest.approx(1.0)
    assert score.shape == (2,)
    content, style = torch.randn(1, 50, 4) * 3 + 1, torch.randn(1, 50, 4) * 0.5 - 2
    aligned = adain(content, style)
    assert torch.allclose(aligned.mean(1), style.mean(1), atol=1e-4)
    assert torch.allclose(aligned.std(1), style.std(1), atol=1e-3)
