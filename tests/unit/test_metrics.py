"""Metrics against known values and against plain re-expressions of BasicSR's functions (its conventions)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

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
