import pytest
import torch

from restoration.models.adaptor import AdaptedUNet, AdaptorConfig
from restoration.models.base import encode_prompt, load_sdxl, size_crop_time_ids
from restoration.models.experts import add_expert, expert_names, set_expert_weights, train_only
from restoration.models.presets import load_preset


@pytest.fixture(scope="module")
def setup():
    networks = load_sdxl(load_preset("tiny")).frozen()
    semantic, pooled = encode_prompt(networks, ["a photo"])
    restoration, restoration_pooled = encode_prompt(networks, ["Remove all degradation"])
    time_ids = size_crop_time_ids((64, 64), (0, 0), (64, 64), batch=1)
    model = AdaptedUNet(networks.unet, AdaptorConfig(connector="modulation"))
    with torch.no_grad():  # trained connectors: zero-initialised ones would hide every adaptor change
        for block in model.connectors:
            for connector in block:
                connector.gamma.weight.normal_(0, 0.05)
    generator = torch.Generator().manual_seed(0)
    x, lq = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 4, 16, 16, generator=generator)

    def run():
        with torch.no_grad():
            return model(x, torch.tensor([400]), semantic, {"text_embeds": pooled, "time_ids": time_ids}, lq, restoration,
                         {"text_embeds": restoration_pooled, "time_ids": time_ids})  # fmt: skip

    return model, run


def _randomise(model, name):
    with torch.no_grad():
        for module in model.adaptor.modules():
            if hasattr(module, "lora_B") and name in module.lora_B:
                module.lora_B[name].weight.normal_(0, 0.05)


def test_experts_add_blend_and_stay_untouched(setup):
    model, run = setup
    for name in ("noise", "blur"):
        add_expert(model.adaptor, name)
        _randomise(model, name)
    assert expert_names(model.adaptor) == ["noise", "blur"]
    noise_weights = {n: p.clone() for n, p in model.adaptor.named_parameters() if ".noise." in n}
    add_expert(model.adaptor, "haze")  # a new degradation: one more adapter, the others untouched
    assert all(torch.equal(p, noise_weights[n]) for n, p in model.adaptor.named_parameters() if ".noise." in n)
    with pytest.raises(ValueError, match="already exists"):
        add_expert(model.adaptor, "noise")

    set_expert_weights(model.adaptor, {"noise": 1.0})
    noise_alone = run()
    set_expert_weights(model.adaptor, {"noise": 1.0, "blur": 0.0, "haze": 0.0})
    assert torch.allclose(run(), noise_alone, atol=1e-6)  # one-hot blending == that expert alone
    set_expert_weights(model.adaptor, {"blur": 1.0})
    blur_alone = run()
    assert not torch.allclose(blur_alone, noise_alone)
    set_expert_weights(model.adaptor, {"noise": 0.5, "blur": 0.5})
    mixed = run()
    assert not torch.allclose(mixed, noise_alone) and not torch.allclose(mixed, blur_alone)
    with pytest.raises(KeyError, match="unknown experts"):
        set_expert_weights(model.adaptor, {"snow": 1.0})

    trainable = train_only(model.adaptor, "haze")
    assert trainable and all(p.requires_grad for p in trainable)
    assert not any(p.requires_grad for n, p in model.adaptor.named_parameters() if ".haze." not in n)
