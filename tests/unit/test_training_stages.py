"""Each training stage, as pure torch: a few AdamW steps on one fixed batch (fixed noise and timesteps) lower its loss."""

import numpy as np
import pytest
import torch
from PIL import Image

from restoration.degradations import single_degrade
from restoration.restorer import Restorer
from training.config import TrainConfig
from training.stages import Batch, Stage, enable_gradient_checkpointing, prepare_restorer


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
        TrainConfig(precision="bf16")
