import numpy as np
import pytest
import torch

from restoration.degradations import CompositeConfig, composite_degrade, single_degrade
from restoration.models.base import load_vae
from restoration.models.encoder import RobustEncoder
from restoration.models.estimator import DegradationEstimator
from restoration.models.presets import load_preset


def test_robust_encoder_starts_as_the_vae_encoder_and_trains_alone():
    vae = load_vae(load_preset("tiny").vae).eval().requires_grad_(False)
    encoder = RobustEncoder(vae)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    latents = encoder(images)
    assert torch.allclose(latents, expected, atol=1e-5)
    (vae.decode(latents / vae.config.scaling_factor).sample - images).square().mean().backward()
    assert all(p.grad is None for p in vae.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float()[None] / 127.5 - 1


def test_estimator_targets_weights_and_learning():
    import cv2
    import skimage.data

    photo = cv2.resize(skimage.data.astronaut(), (64, 64), interpolation=cv2.INTER_AREA)
    estimator = DegradationEstimator([1, 2, 6], width=8)
    composite = composite_degrade(photo, np.random.default_rng(0), CompositeConfig(types=("noise", "blur", "haze"), regions=(3, 3)))
    masks = torch.from_numpy(composite.mask)[None]
    targets = estimator.mask_targets(masks)
    for index, type_id in enumerate(estimator.type_ids):
        degraded = (composite.mask > 0).sum()
        assert targets[0, index].item() == pytest.approx((composite.mask == type_id).sum() / max(degraded, 1))
    torch.manual_seed(0)
    samples = [single_degrade(photo, np.random.default_rng(s), t) for s in range(4) for t in ("noise", "blur", "haze")]
    images = torch.cat([_tensor(s.lq) for s in samples])
    sample_masks = torch.stack([torch.from_numpy(s.mask) for s in samples])
    optimizer = torch.optim.Adam(estimator.parameters(), lr=3e-3)
    first = estimator.loss(images, sample_masks).item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = estimator.loss(images, sample_masks)
        loss.backward()
        optimizer.step()
    assert loss.item() < first * 0.5
    one_hot = estimator.weights(images, "one_hot")
    assert torch.equal(one_hot.sum(1), torch.ones(len(samples))) and set(one_hot.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(estimator.weights(images, "soft").sum(1), torch.ones(len(samples)))
