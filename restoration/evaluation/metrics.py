"""Full-reference metrics under the conventions the papers report with, computed by torchmetrics.

Conventions (`MetricConvention`): the colour space scored (`rgb`, or `y`: the luma of ITU-R BT.601 in the studio
range 16-235, as BasicSR's `bgr2ycbcr(y_only=True)` and pyiqa's `color_space='ycbcr'` compute it) and the border
cropped before scoring. BasicSR's protocol is `y` with `crop_border = scale`; ReFIR's `cal_iqa.py` is `y` with no
crop. Images are H x W x 3 uint8 RGB; the Y channel is kept in float (0-255 scale), never rounded, as BasicSR does.

PSNR is 10 log10(255^2 / MSE) on the 0-255 scale; SSIM is Wang et al.'s with an 11-tap Gaussian window (sigma 1.5),
K1 0.01, K2 0.03 and data range 255, averaged over the valid region of the filtered image, which is BasicSR's
`calculate_ssim`. torchmetrics (1.9) computes the map on a reflection-padded image and averages all of it, borders
included, which differs from BasicSR by about 1e-3 on a 72 x 80 image: we take its map and average the valid part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

# BT.601 luma on [0, 1] RGB in the studio range (x 255): Y = 16 + 65.481 R + 128.553 G + 24.966 B.
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])


@dataclass(frozen=True)
class MetricConvention:
    color_space: Literal["rgb", "y"] = "y"
    crop_border: int = 0

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """H x W x C float64 on the 0-255 scale, in this convention's colour space, border cropped."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} {image.shape}")
        pixels = image.astype(np.float64)
        if self.color_space == "y":
            pixels = (pixels / 255.0) @ _Y_WEIGHTS[:, None] + 16.0
        if self.crop_border:
            border = self.crop_border
            pixels = pixels[border:-border, border:-border]
        return pixels


BASICSR = MetricConvention("y", 4)  # BasicSR's test_y_channel=True with crop_border = 4 (x4 super-resolution)
REFIR = MetricConvention("y", 0)  # ReFIR's cal_iqa.py: pyiqa psnr/ssim, test_y_channel=True, color_space='ycbcr'


def _pair(output: np.ndarray, target: np.ndarray, convention: MetricConvention) -> tuple[torch.Tensor, torch.Tensor]:
    if output.shape != target.shape:
        raise ValueError(f"output {output.shape} and target {target.shape} differ in size")
    as_tensor = [torch.from_numpy(convention.prepare(image)).permute(2, 0, 1)[None] for image in (output, target)]
    return as_tensor[0], as_tensor[1]


def psnr(output: np.ndarray, target: np.ndarray, convention: MetricConvention = REFIR) -> float:
    """PSNR in dB (inf for identical images)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    predicted, reference = _pair(output, target, convention)
    if torch.equal(predicted, reference):
        return float("inf")
    return float(peak_signal_noise_ratio(predicted, reference, data_range=255.0))


def ssim(output: np.ndarray, target: np.ndarray, convention: MetricConvention = REFIR) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    predicted, reference = _pair(output, target, convention)
    _, ssim_map = structural_similarity_index_measure(
        predicted, reference, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=255.0, k1=0.01, k2=0.03, return_full_image=True
    )
    # torchmetrics averages the whole map, borders included (their windows reach into its reflection padding);
    # BasicSR and the papers average the valid region only: 5 px (half the window) in from each side.
    return float(ssim_map[..., 5:-5, 5:-5].mean())


PLAIN_METRICS = {"psnr": psnr, "ssim": ssim}  # the metrics that need no weights (learned.py has the others)
