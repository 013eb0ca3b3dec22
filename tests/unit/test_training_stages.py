"""Each training stage, as pure torch: a few AdamW steps on one fixed batch (fixed noise and timesteps) lower its loss."""

import numpy as np
import pytest
import torch
from PIL import Image

from restoration.degradations import single_degrade
from restoration.models.adaptor import enable_gradient_checkpointing
from restoration.restorer import Restorer
from training.config import TrainConfig
from training.stages import Batch, Stage, prepare_restorer


@pytest.fixture(scope="module")
def batch():
    import skimage.data

    hq = np.array(Image.fromarray(skimage.data.chelsea()).resize((64, 64)))
    sample = single_degrade(hq, np.random.default_rng(0), 1)  # noise
    to_tensor = lambda image: torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1  # noqa: E731
    return Batch(
        hq=to_tensor(sample.hq),
        lq=to_tensor(sample.lq),
        masks=torch.from_numpy(sample.mask)[None],
        captions=["a cat"],
        restoration_prompts=[sample.restoration_prompt],
        kinds=["single"],
    )


def _train(stage: Stage, batch: Batch, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW(stage.parameters, lr=lr)
    losses = []
    for _ in range(steps):
        inputs = stage.prepare(batch, torch.Generator().manual_seed(0))  # the same noise and timesteps every step
        loss = stage.module(**inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    ("stage_name", "extra", "lr"),
    [("adaptor", {}, 1e-3), ("encoder", {}, 1e-3), ("experts", {"expert": "noise"}, 1e-2), ("estimator", {}, 1e-3)],
)
def test_each_stage_lowers_its_loss_on_a_fixed_batch(batch, stage_name, extra, lr):
    config = TrainConfig(stage=stage_name, caption_dropout=0.0, restoration_prompt_dropout=0.0, **extra)
    restorer = prepare_restorer(Restorer("tiny"), config)
    if stage_name == "experts":  # experts train on a trained adaptor: zero-initialised connectors would pass no gradient
        with torch.no_grad():
            for block in restorer.model.connectors:
                for connector in block:
                    connector.gamma.weight.normal_(0, 0.05)
    stage = Stage(restorer, config)
    frozen_before = {name: p.clone() for name, p in restorer.networks.unet.named_parameters()}
    trainable = {id(p) for p in stage.parameters}
    assert trainable and all(p.requires_grad for p in stage.parameters)
    assert not any(p.requires_grad for p in restorer.networks.unet.parameters())  # frozen networks stay out
    losses = _train(stage, batch, steps=6, lr=lr)
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(torch.equal(p, frozen_before[name]) for name, p in restorer.networks.unet.named_parameters())
    if stage_name == "experts":
        lora = [name for name, p in restorer.model.named_parameters() if id(p) in trainable]
        assert lora and all(".noise." in name for name in lora)  # only this expert's LoRA weights train


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    config = TrainConfig(stage="adaptor", caption_dropout=0.0, restoration_prompt_dropout=0.0)

    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        stage = Stage(Restorer("tiny"), config)
        if checkpointing:
            assert enable_gradient_checkpointing(stage.module) > 0
        stage.module(**stage.prepare(batch, torch.Generator().manual_seed(0))).backward()
        return [p.grad.clone() for p in stage.parameters if p.grad is not None]

    plain, checkpointed = gradients(False), gradients(True)
    assert len(plain) == len(checkpointed) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))


def test_bad_training_configs_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"needs train\.expert"):
        TrainConfig(stage="experts")
    with pytest.raises(ValidationError, match="needs GPUs"):
        TrainConfig(precision="fp16")
    assert TrainConfig(precision="bf16").precision == "bf16"  # DeepSpeed's CPU backend runs bf16


def test_bf16_training_holds_the_frozen_networks_in_bf16_and_the_trained_ones_in_fp32(batch):
    config = TrainConfig(stage="adaptor", precision="bf16", caption_dropout=0.0, restoration_prompt_dropout=0.0)
    restorer = Restorer("tiny")
    stage = Stage(restorer, config)
    held = stage.hold_frozen_in(torch.bfloat16)
    assert held == ["unet", "vae", "text_encoder", "text_encoder_2", "encoder"]
    networks = restorer.networks
    for module in (networks.unet, networks.vae, networks.text_encoder, networks.text_encoder_2, restorer.encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in stage.parameters} == {torch.float32}  # DeepSpeed makes the fp32 masters from these
    inputs = stage.prepare(batch, torch.Generator().manual_seed(0))
    assert inputs["latents"].dtype == inputs["lq_latents"].dtype == inputs["prompt_embeds"].dtype == torch.bfloat16
    # As DeepSpeed's engine does under bf16: the module in bf16, the inputs cast; the loss is finite, gradients flow.
    stage.module.to(torch.bfloat16)
    loss = stage.module(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()})
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters)
    encoder_stage = Stage(Restorer("tiny"), TrainConfig(stage="encoder", precision="bf16"))
    assert "encoder" not in encoder_stage.hold_frozen_in(torch.bfloat16)  # the trained network is left to DeepSpeed
    assert {p.dtype for p in encoder_stage.restorer.encoder.parameters()} == {torch.float32}
