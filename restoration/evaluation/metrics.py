"""PSNR and SSIM as the field computes them: one named convention per reference implementation the papers score with.

A convention fixes the colour space, the rounding, the window and the constants; `crop_border` (pixels cut from each
side before scoring) is given beside it. Inputs are H x W x 3 uint8 RGB images, as decoded from the files.

- `basicsr`: BasicSR's `calculate_psnr` / `calculate_ssim` with `test_y_channel=True`: the luma of ITU-R BT.601 in
  the studio range (Y = 16 + 65.481 R + 128.553 G + 24.966 B on [0, 1] RGB) kept as a float (float32 in BasicSR,
  float64 here: 1e-6 dB apart), never rounded; PSNR
  on the 0-255 scale (inf for equal images); SSIM with an 11-tap Gaussian window (sigma 1.5), K1 0.01, K2 0.03,
  averaged over the valid region (`cv2.filter2D` then a 5-pixel crop).
- `pyiqa`: pyiqa's default `psnr` and `ssim` metrics (0.1.16). PSNR scores RGB as float32 in [0, 1] with
  data range 1 and eps 1e-8 in the MSE (80 dB for equal images). SSIM scores the Y of YIQ (0.299 R + 0.587 G +
  0.114 B, computed in float32, x 255 and rounded to integers), in float64, with the same window over the valid
  region and the contrast-structure term clamped at 0 (`F.relu(cs_map)`), data range 255.
- `refir`: pyiqa with `test_y_channel=True, color_space='ycbcr'`, as ReFIR's `cal_iqa.py` scores: PSNR on the
  studio-range Y / 255 (float32, not rounded, data range 1, eps 1e-8); SSIM as `pyiqa` but on the studio-range Y
  x 255, rounded.
- `promptir`: PromptIR's `compute_psnr_ssim` (the tables ABAIR compares with): RGB as float32 in [0, 1],
  scikit-image's `peak_signal_noise_ratio(data_range=1)` and `structural_similarity(data_range=1, channel_axis=-1)`
  (a 7 x 7 uniform window, sample covariance; the `multichannel=True` PromptIR passes is `channel_axis=-1` in
  scikit-image 0.26).

pyiqa's rounding and its clamp cannot be expressed through torchmetrics' SSIM, so the Gaussian SSIM is written here
once, in float64, for the three conventions that use it; scikit-image is PromptIR's own implementation and is called.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from restoration.evaluation.conventions import BASICSR, CONVENTIONS, REFIR, ConventionName, MetricConvention

__all__ = ["BASICSR", "CONVENTIONS", "PLAIN_METRICS", "REFIR", "MetricConvention", "psnr", "ssim"]

# [0, 1] RGB -> the first row of each colour transform pyiqa and BasicSR use.
_YCBCR_Y = (65.481, 128.553, 24.966)  # + 16: BT.601 studio range, on the 0-255 scale
_YIQ_Y = (0.299, 0.587, 0.114)  # full range, on [0, 1]
_PYIQA_EPS = 1e-8


def _checked(output: np.ndarray, target: np.ndarray, convention: MetricConvention) -> tuple[np.ndarray, np.ndarray]:
    for image in (output, target):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} {image.shape}")
    if output.shape != target.shape:
        raise ValueError(f"output {output.shape} and target {target.shape} differ in size")
    output, target = convention.crop(output), convention.crop(target)
    if output.size == 0:
        raise ValueError(f"nothing left to score after a border crop of {convention.crop_border}")
    return output, target


def _unit_float32(image: np.ndarray) -> torch.Tensor:
    """1 x 3 x H x W float32 in [0, 1], as pyiqa's loader (torchvision's to_tensor) and PromptIR's ToTensor give."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def _luma(image: np.ndarray, convention: ConventionName, rounded: bool) -> torch.Tensor:
    """1 x 1 x H x W float64 luma on the 0-255 scale, computed in the precision and order its convention uses."""
    if convention == "basicsr":  # float64 throughout, never rounded
        return torch.from_numpy(image.astype(np.float64) / 255.0 @ np.array(_YCBCR_Y) + 16.0)[None, None]
    rgb = _unit_float32(image).permute(0, 2, 3, 1)  # pyiqa: a float32 matmul on channels-last
    if convention == "pyiqa":
        luma = (rgb @ torch.tensor(_YIQ_Y)) * 255.0
    else:  # refir: pyiqa's rgb2ycbcr, then / 255 and x the data range 255
        luma = (rgb @ torch.tensor(_YCBCR_Y) + 16.0) / 255.0 * 255.0
    luma = luma.round() if rounded else luma
    return luma[:, None].double()


def _gaussian_window() -> torch.Tensor:
    offsets = torch.arange(11, dtype=torch.float64) - 5.0
    window = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    return (window / window.sum()).float().double()[None, None]  # pyiqa's fspecial builds it in float32


def _gaussian_ssim(a: torch.Tensor, b: torch.Tensor, clamp_contrast: bool) -> float:
    """Wang et al.'s SSIM of two 1 x 1 x H x W float64 images on the 0-255 scale: 11 x 11 Gaussian (sigma 1.5), valid
    region only; `clamp_contrast`: pyiqa's F.relu on the contrast-structure term."""
    window = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = F.conv2d(a, window), F.conv2d(b, window)
    var_a = F.conv2d(a * a, window) - mu_a**2
    var_b = F.conv2d(b * b, window) - mu_b**2
    covariance = F.conv2d(a * b, window) - mu_a * mu_b
    contrast = (2 * covariance + c2) / (var_a + var_b + c2)
    if clamp_contrast:
        contrast = contrast.clamp(min=0)
    return float((((2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)) * contrast).mean())


def psnr(output: np.ndarray, target: np.ndarray, convention: MetricConvention = REFIR) -> float:
    """PSNR in dB of `output` against `target` under `convention`."""
    output, target = _checked(output, target, convention)
    if convention.name == "basicsr":
        mse = float(((_luma(output, "basicsr", False) - _luma(target, "basicsr", False)) ** 2).mean())
        return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
    if convention.name == "promptir":
        from skimage.metrics import peak_signal_noise_ratio

        unit = [_unit_float32(image)[0].permute(1, 2, 0).numpy() for image in (target, output)]
        return float(peak_signal_noise_ratio(unit[0], unit[1], data_range=1))
    if convention.name == "pyiqa":
        difference = _unit_float32(output) - _unit_float32(target)
    else:  # refir: the studio-range Y on [0, 1]
        difference = (_luma(output, "refir", False) - _luma(target, "refir", False)) / 255.0
    mse = float((difference.double() ** 2).mean())
    return float(10.0 * np.log10(1.0 / (mse + _PYIQA_EPS)))


def ssim(output: np.ndarray, target: np.ndarray, convention: MetricConvention = REFIR) -> float:
    """SSIM of `output` against `target` under `convention`."""
    output, target = _checked(output, target, convention)
    if min(output.shape[:2]) < 11:
        size = f"{output.shape[1]}x{output.shape[0]}"
        raise ValueError(f"{size} (after a border crop of {convention.crop_border}) is smaller than SSIM's 11-pixel window")
    if convention.name == "promptir":
        from skimage.metrics import structural_similarity

        unit = [_unit_float32(image)[0].permute(1, 2, 0).numpy() for image in (target, output)]
        return float(structural_similarity(unit[0], unit[1], data_range=1, channel_axis=-1))
    pyiqa_like = convention.name != "basicsr"
    lumas = [_luma(image, convention.name, rounded=pyiqa_like) for image in (output, target)]
    return _gaussian_ssim(lumas[0], lumas[1], clamp_contrast=pyiqa_like)


PLAIN_METRICS = {"psnr": psnr, "ssim": ssim}  # the metrics that need no weights (learned.py has the others)
