import pytest
import torch

from restoration.models.adaptor import AdaptedUNet
from restoration.models.base import encode_prompt, load_sdxl, size_crop_time_ids
from restoration.models.presets import load_preset
from restoration.retrieval import injection
from restoration.retrieval.injection import (
    InjectionConfig,
    ReferenceController,
    adain,
    block_of,
    decoder_self_attention_layers,
    install,
    spatial_gate,
    uninstall,
)


@pytest.fixture(scope="module")
def tiny():
    networks = load_sdxl(load_preset("tiny")).frozen()
    embeds, pooled = encode_prompt(networks, ["a photo"])
    added = {"text_embeds": pooled, "time_ids": size_crop_time_ids((64, 64), (0, 0), (64, 64), batch=1)}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AdaptedUNet(networks.unet).eval()
    return model, embeds, added


def _run(model, x, embeds, added, lq=None):
    lq = torch.zeros_like(x) if lq is None else lq
    with torch.no_grad():
        return model(x, torch.tensor([300.0]), embeds, added, lq, embeds, added)


def test_gate_zero_is_no_reference_and_an_identical_reference_changes_little(tiny):
    model, embeds, added = tiny
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(1, 4, 16, 16, generator=generator)
    reference = torch.randn(1, 4, 16, 16, generator=generator)
    plain = _run(model, target, embeds, added)
    controller = ReferenceController(InjectionConfig(gate_scale=0.0))
    processors = dict(model.unet.attn_processors)
    layers = install(model, controller)
    assert layers and all(name.startswith("up_blocks") and ".attn1." in name for name in layers)
    try:
        controller.mode = "record"
        _run(model, reference, embeds, added)
        controller.mode = "inject"
        assert torch.allclose(_run(model, target, embeds, added), plain, atol=1e-5)  # gate scale 0 == no reference

        controller.config.gate_scale = 1.0
        injected = _run(model, target, embeds, added)
        assert not torch.allclose(injected, plain, atol=1e-4)  # a different reference does change the output

        controller.clear()
        controller.mode = "record"
        _run(model, target, embeds, added)
        controller.mode = "inject"
        assert torch.allclose(_run(model, target, embeds, added), plain, atol=1e-4)  # the target as its own reference

        controller.config.similarity_threshold = 2.0  # no reference is similar enough: plain attention
        assert torch.allclose(_run(model, target, embeds, added), plain, atol=1e-5)
    finally:
        uninstall(model, processors)
    assert model.block_observer is None and dict(model.unet.attn_processors) == processors


def test_the_gate_is_computed_once_per_decoder_position_and_shared_across_its_depth(tiny, monkeypatch):
    model, embeds, added = tiny
    layers = decoder_self_attention_layers(model.unet)
    positions = sorted({block_of(name) for name in layers})
    # The tiny decoder's transformers are two blocks deep: more self-attention layers than positions.
    assert len(layers) == 2 * len(positions)
    calls, reads = [], []
    real_gate = injection.spatial_gate
    monkeypatch.setattr(injection, "spatial_gate", lambda *args: calls.append(1) or real_gate(*args))
    controller = ReferenceController()
    processors = dict(model.unet.attn_processors)
    install(model, controller)
    original = injection.ReferenceAttnProcessor.__call__

    def spy(self, attn, hidden_states, *args, **kwargs):
        if controller.mode == "inject":
            reads.append((self.block, id(controller.gates[self.block][0])))
        return original(self, attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(injection.ReferenceAttnProcessor, "__call__", spy)
    try:
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        controller.mode = "record"
        _run(
            model,
            torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2)),
            embeds.expand(2, -1, -1),
            {key: value.expand(2, *value.shape[1:]) for key, value in added.items()},
        )
        assert set(controller.features) == set(positions) and all(f.shape[0] == 2 for f in controller.features.values())
        controller.mode = "inject"
        _run(model, x, embeds, added)
    finally:
        uninstall(model, processors)
    assert len(calls) == 2 * len(positions)  # once per position and reference, not per layer
    by_block = {}
    for block, gate_id in reads:
        by_block.setdefault(block, set()).add(gate_id)
    assert len(reads) == len(layers) and all(len(ids) == 1 for ids in by_block.values())


def test_gate_and_adain():
    features = torch.randn(2, 10, 8)
    gate, score = spatial_gate(features, features[:, :4])
    assert gate.shape == (2, 10, 1) and gate.min() == 0 and gate.max() == pytest.approx(1.0)
    assert score.shape == (2,)
    content, style = torch.randn(1, 50, 4) * 3 + 1, torch.randn(1, 50, 4) * 0.5 - 2
    aligned = adain(content, style)
    assert torch.allclose(aligned.mean(1), style.mean(1), atol=1e-4)
    assert torch.allclose(aligned.std(1), style.std(1), atol=1e-3)


def test_one_batch_of_target_and_reference_equals_recording_then_injecting(tiny):
    model, embeds, added = tiny
    generator = torch.Generator().manual_seed(5)
    target, reference = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 4, 16, 16, generator=generator)
    controller = ReferenceController()
    processors = dict(model.unet.attn_processors)
    install(model, controller)
    try:
        controller.mode = "record"
        _run(model, reference, embeds, added)
        controller.mode = "inject"
        apart = _run(model, target, embeds, added)
        controller.clear()
        controller.mode, controller.split = "batched", 1
        wide = {key: value.expand(2, *value.shape[1:]) for key, value in added.items()}
        together = _run(model, torch.cat([target, reference]), embeds.expand(2, -1, -1), wide)
    finally:
        uninstall(model, processors)
    plain_reference = _run(model, reference, embeds, added)
    assert torch.allclose(together[:1], apart, atol=1e-4) and not torch.allclose(apart, _run(model, target, embeds, added), atol=1e-4)
    assert torch.allclose(together[1:], plain_reference, atol=1e-4)  # the reference itself is not injected
