"""Metrics against known values and against plain re-expressions of BasicSR's functions (its conventions)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from restoration.evaluation.metrics import BASICSR, REFIR, MetricConvention, psnr, ssim


def basicsr_y(image_rgb: np.ndarray) -> np.ndarray:
    """BasicSR's to_y_channel on a cv2 (BGR) image: float32 / 255, bgr2ycbcr(y_only=True), x 255."""
    bgr = image_rgb[..., ::-1].astype(np.float32) / 255.0
    return (np.dot(bgr, [24.966, 128.553, 65.481]) + 16.0)[..., None]


def basicsr_psnr(a: np.ndarray, b: np.ndarray, crop_border: int) -> float:
    a, b = basicsr_y(a).astype(np.float64), basicsr_y(b).astype(np.float64)
    if crop_border:
        a, b = a[crop_border:-crop_border, crop_border:-crop_border], b[crop_border:-crop_border, crop_border:-crop_border]
    return 10.0 * np.log10(255.0**2 / np.mean((a - b) ** 2))


def basicsr_ssim(a: np.ndarray, b: np.ndarray, crop_border: int) -> float:
    a, b = basicsr_y(a).astype(np.float64)[..., 0], basicsr_y(b).astype(np.float64)[..., 0]
    if crop_border:
        a, b = a[crop_border:-crop_border, crop_border:-crop_border], b[crop_border:-crop_border, crop_border:-crop_border]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    mu1, mu2 = cv2.filter2D(a, -1, window)[5:-5, 5:-5], cv2.filter2D(b, -1, window)[5:-5, 5:-5]
    sigma1 = cv2.filter2D(a**2, -1, window)[5:-5, 5:-5] - mu1**2
    sigma2 = cv2.filter2D(b**2, -1, window)[5:-5, 5:-5] - mu2**2
    sigma12 = cv2.filter2D(a * b, -1, window)[5:-5, 5:-5] - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / ((mu1**2 + mu2**2 + c1) * (sigma1 + sigma2 + c2))
    return float(ssim_map.mean())


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    target = cv2.GaussianBlur(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8), (5, 5), 2)
    noisy = np.clip(target.astype(int) + rng.normal(0, 12, target.shape), 0, 255).astype(np.uint8)
    return noisy, target


def test_psnr_of_a_known_mse_and_ssim_of_an_image_with_itself():
    target = np.full((32, 32, 3), 100, np.uint8)
    output = target.copy()
    output[::2] += 10  # half the pixels off by 10 in every channel: MSE 50 in RGB
    assert psnr(output, target, MetricConvention("rgb")) == pytest.approx(10 * math.log10(255**2 / 50), abs=1e-5)
    assert psnr(target, target) == math.inf
    assert ssim(target, target, BASICSR) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("convention, crop", [(BASICSR, 4), (REFIR, 0)])
def test_y_channel_psnr_and_ssim_equal_basicsr_re_expressed(pair, convention, crop):
    noisy, target = pair
    assert psnr(noisy, target, convention) == pytest.approx(basicsr_psnr(noisy, target, crop), abs=1e-4)
    assert ssim(noisy, target, convention) == pytest.approx(basicsr_ssim(noisy, target, crop), abs=1e-4)
    assert psnr(noisy, target, convention) != pytest.approx(psnr(noisy, target, MetricConvention("rgb", crop)), abs=1e-3)


def test_unequal_sizes_are_refused(pair):
    noisy, target = pair
    with pytest.raises(ValueError, match="differ in size"):
        psnr(noisy[:-1], target)


# Learned metrics from local files (tiny random weights: the scores mean nothing, the loading and scoring are real).


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from tests.metric_weights import clip_folder, inception_weights, squeezenet_weights

    root = tmp_path_factory.mktemp("metric-weights")
    return {
        "lpips": squeezenet_weights(root / "squeezenet.safetensors"),
        "lpips_other": squeezenet_weights(root / "squeezenet-other.safetensors", seed=1),
        "fid": inception_weights(root / "inception.pth"),
        "clipiqa": clip_folder(root / "clip"),
    }


def noise(seed: int, shape=(48, 64, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def test_lpips_loads_the_backbone_from_the_given_file_and_never_downloads(weights, tmp_path, monkeypatch):
    from restoration.evaluation.learned import build_scorer

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))  # a download would land here: nothing may
    score = build_scorer("lpips", weights["lpips"], lpips_net="squeeze")
    a, b = noise(0), noise(1)
    assert score(a, a) == pytest.approx(0.0, abs=1e-6) and score(a, b) > 0
    other = build_scorer("lpips", weights["lpips_other"], lpips_net="squeeze")
    assert other(a, b) != pytest.approx(score(a, b), rel=1e-4)  # the file's weights are what scores
    assert not (tmp_path / "empty-hub").exists()


def test_fid_over_sets_and_clipiqa_per_image_from_local_files(weights):
    from restoration.errors import InputError
    from restoration.evaluation.learned import build_scorer

    fid = build_scorer("fid", weights["fid"])
    textured = [noise(seed) for seed in range(3)]
    flat = [np.full((48, 64, 3), value, np.uint8) for value in (30, 120, 220)]
    assert abs(fid(textured, textured)) < 1e-3 and fid(flat, textured) > 1.0
    with pytest.raises(InputError, match="at least 2 images"):
        fid(flat[:1], textured[:1])
    clipiqa = build_scorer("clipiqa", weights["clipiqa"])
    scores = [clipiqa(image) for image in (textured[0], flat[0])]
    assert all(0.0 <= value <= 1.0 for value in scores) and scores[0] != scores[1]


def test_a_weights_file_that_is_not_a_plain_state_dict_is_refused(tmp_path):
    from restoration.errors import InputError
    from restoration.evaluation.learned import read_state_dict

    pickled = tmp_path / "model.pth"
    torch.save({"net": torch.nn.Linear(2, 2)}, pickled)  # a pickled module: weights_only=True refuses it
    with pytest.raises(InputError, match="not a safetensors file or a plain torch state dict"):
        read_state_dict(pickled)
    with pytest.raises(InputError, match="does not exist"):
        read_state_dict(tmp_path / "missing.safetensors")


def test_metric_plan_skips_what_has_no_weights_and_refuses_what_was_asked_for(tmp_path):
    from restoration.errors import InputError
    from restoration.evaluation.learned import LEARNED, plan_metrics, pyiqa_available

    plan = plan_metrics(None, {}, has_reference=True)
    assert plan.full == ["psnr", "ssim"] and plan.sets == [] and plan.no_reference == []
    assert set(plan.skipped) == set(LEARNED) and "eval.weights.lpips" in plan.skipped["lpips"]
    present = tmp_path / "alexnet.safetensors"
    present.write_bytes(b"")
    plan = plan_metrics(None, {"lpips": str(present), "fid": str(present), "clipiqa": str(tmp_path)}, has_reference=True)
    assert plan.full == ["psnr", "ssim", "lpips"] and plan.sets == ["fid"] and plan.no_reference == ["clipiqa"]
    no_reference = plan_metrics(None, {"clipiqa": str(tmp_path)}, has_reference=False)
    assert no_reference.names == ["clipiqa"] and "HQ reference" in no_reference.skipped["psnr"]
    with pytest.raises(InputError, match=r"asks for lpips, which needs eval\.weights\.lpips"):
        plan_metrics(["psnr", "lpips"], {}, has_reference=True)
    with pytest.raises(InputError, match=r"eval.weights.fid: .*missing.pth does not exist"):
        plan_metrics(None, {"fid": str(tmp_path / "missing.pth")}, has_reference=True)
    with pytest.raises(InputError, match="unknown \\['sharpness'\\]"):
        plan_metrics(["sharpness"], {}, has_reference=True)
    with pytest.raises(InputError, match="asks for psnr, which needs an HQ reference"):
        plan_metrics(["psnr"], {}, has_reference=False)
    if not pyiqa_available():  # the core install: MUSIQ & co. say which extra they need
        plan = plan_metrics(None, {"musiq": str(present)}, has_reference=True)
        assert "restoray[iqa]" in plan.skipped["musiq"]


def test_held_out_protocol_chains_degradations_per_case_seeded():
    from restoration.evaluation.protocols import load_protocol

    protocol = load_protocol("abair-heldout")
    hq = noise(3, (64, 64, 3))
    cases = {case: protocol.degrade(hq, "a.png", case) for case in protocol.cases()}
    assert {case: [op["op"] for op in ops] for case, (_, _, ops) in cases.items()} == {
        "jpeg": ["jpeg"],
        "blur+noise": ["blur", "noise"],
        "blur+jpeg": ["blur", "jpeg"],
    }
    again = protocol.degrade(hq, "a.png", "blur+noise")
    assert np.array_equal(again[1], cases["blur+noise"][1]) and not np.array_equal(cases["blur+noise"][1], hq)
