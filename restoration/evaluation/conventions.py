"""The metric conventions by name (what `restoray eval --convention` and a protocol's `[metrics] convention` take):
light enough for the CLI to list them without importing torch. `metrics.py` computes each one and says how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ConventionName = Literal["basicsr", "pyiqa", "refir", "promptir"]
CONVENTIONS: dict[str, str] = {
    "basicsr": "BasicSR's calculate_psnr/ssim: BT.601 studio-range Y in float, Gaussian SSIM over the valid region",
    "pyiqa": "pyiqa's defaults: PSNR on RGB; SSIM on the rounded Y of YIQ, contrast term clamped at 0",
    "refir": "pyiqa with test_y_channel=True, color_space='ycbcr' (ReFIR's cal_iqa.py): studio-range Y, rounded for SSIM",
    "promptir": "PromptIR's compute_psnr_ssim (ABAIR's tables): RGB, scikit-image's PSNR and 7x7 uniform SSIM",
}


@dataclass(frozen=True)
class MetricConvention:
    name: ConventionName = "refir"
    crop_border: int = 0

    def __post_init__(self) -> None:
        if self.name not in CONVENTIONS:
            raise ValueError(f"unknown metric convention {self.name!r}; known: {', '.join(CONVENTIONS)}")
        if self.crop_border < 0:
            raise ValueError(f"crop_border must be >= 0, got {self.crop_border}")

    def crop(self, image: np.ndarray) -> np.ndarray:
        border = self.crop_border
        return image[border:-border, border:-border] if border else image


BASICSR = MetricConvention("basicsr", 4)  # x4 super-resolution as BasicSR's test configs score it
REFIR = MetricConvention("refir", 0)
