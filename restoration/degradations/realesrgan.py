"""Real-ESRGAN's second-order degradation (Wang et al. 2021), with BasicSR's published defaults.

Defaults (`RealESRGANConfig`, as in BasicSR's `train_realesrgan_x4plus.yml`):
- first blur: kernel size uniform over odd 7..21; sinc with probability 0.1 (cutoff U[pi/3, pi], U[pi/5, pi]
  from size 13), else kernels iso/aniso/generalized_iso/generalized_aniso/plateau_iso/plateau_aniso with
  probabilities [0.45, 0.25, 0.12, 0.03, 0.12, 0.03], sigma U[0.2, 3], rotation U[-pi, pi], generalized beta in
  [0.5, 4], plateau beta in [1, 2] (beta drawn below or above 1 with equal chance, as BasicSR does);
- first resize: up/down/keep with probabilities [0.2, 0.7, 0.1], scale in [0.15, 1.5], mode area/bilinear/bicubic;
- first noise: Gaussian with probability 0.5, sigma U[1, 30]/255, else Poisson scale U[0.05, 3]; gray noise 0.4;
- first JPEG: quality U[30, 95];
- second blur with probability 0.8 (sigma U[0.2, 1.5], same kernel mix, sinc 0.1);
- second resize: [0.3, 0.4, 0.3], scale in [0.3, 1.2] of the target size HQ/scale;
- second noise: sigma U[1, 25]/255, Poisson scale U[0.05, 2.5], gray 0.4;
- last: with probability 0.5 [resize to HQ/scale + sinc] then JPEG U[30, 95], else JPEG then [resize + sinc];
  the final sinc fires with probability 0.8 (size odd 7..21, cutoff U[pi/3, pi]), else no filter;
- clip and quantise to 8 bits. Optionally the target is USM-sharpened (Real-ESRGAN's `l1_gt_usm`).
Each op as BasicSR's: noise clipped to [0, 1] (clip=True), JPEG through DiffJPEG (`ops.diffjpeg`), the first resize
by scale factor (`ops.resize_by_scale`); `bench/realesrgan_distribution.py` compares the LQ statistics.
`scale` is 4; the LQ comes back at HQ/scale, or resized back to the HQ size (`resize_back`, as SUPIR and
DiffBIR train) with bicubic interpolation.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from restoration.degradations import kernels, ops
from restoration.degradations.sample import ChainConfig, DegradedSample
from restoration.prompts import BLIND_PROMPT

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODE_NAMES = ("area", "bilinear", "bicubic")


class BlurConfig(ChainConfig):
    kernel_types: tuple[str, ...] = Field(KERNEL_TYPES, description="Kernel families to draw from.")
    kernel_probabilities: tuple[float, ...] = Field((0.45, 0.25, 0.12, 0.03, 0.12, 0.03), description="Probability of each kernel family.")
    kernel_size: tuple[int, int] = Field((7, 21), description="Odd kernel sizes drawn uniformly from this range.")
    sigma: tuple[float, float] = Field((0.2, 3.0), description="Gaussian sigma range (pixels) for x and y.")
    sinc_probability: float = Field(0.1, ge=0, le=1, description="Chance of a sinc kernel instead of the mix.")
    betag: tuple[float, float] = Field((0.5, 4.0), description="Generalized Gaussian shape range.")
    betap: tuple[float, float] = Field((1.0, 2.0), description="Plateau shape range.")

    def model_post_init(self, _context) -> None:
        if len(self.kernel_types) != len(self.kernel_probabilities) or not math.isclose(sum(self.kernel_probabilities), 1.0, abs_tol=1e-6):
            raise ValueError("kernel_probabilities must match kernel_types and sum to 1")
        unknown = set(self.kernel_types) - set(KERNEL_TYPES)
        if unknown:
            raise ValueError(f"unknown kernel types {sorted(unknown)}; known: {', '.join(KERNEL_TYPES)}")
        if self.kernel_size[0] % 2 == 0 or self.kernel_size[1] % 2 == 0 or self.kernel_size[0] < 3:
            raise ValueError("kernel_size bounds must be odd and at least 3")


class ResizeConfig(ChainConfig):
    probabilities: tuple[float, float, float] = Field((0.2, 0.7, 0.1), description="Chance of up / down / keep.")
    scale: tuple[float, float] = Field((0.15, 1.5), description="Scale range; up draws from [1, high], down from [low, 1].")


class NoiseConfig(ChainConfig):
    gaussian_probability: float = Field(0.5, ge=0, le=1, description="Chance of Gaussian noise (else Poisson).")
    sigma: tuple[float, float] = Field((1.0, 30.0), description="Gaussian sigma range on the 0-255 scale.")
    poisson_scale: tuple[float, float] = Field((0.05, 3.0), description="Poisson noise scale range.")
    gray_probability: float = Field(0.4, ge=0, le=1, description="Chance that the noise is the same in all channels.")


class RealESRGANConfig(ChainConfig):
    """Second-order degradation; every default is BasicSR's (see the module docstring)."""

    scale: int = Field(4, ge=1, le=8, description="HQ/LQ size ratio.")
    resize_back: bool = Field(False, description="Return the LQ resized back to the HQ size (SUPIR/DiffBIR) instead of at 1/scale.")
    blur1: BlurConfig = Field(default_factory=BlurConfig, description="First-order blur.")
    resize1: ResizeConfig = Field(default_factory=ResizeConfig, description="First-order resize.")
    noise1: NoiseConfig = Field(default_factory=NoiseConfig, description="First-order noise.")
    jpeg1: tuple[int, int] = Field((30, 95), description="First-order JPEG quality range.")
    second_blur_probability: float = Field(0.8, ge=0, le=1, description="Chance of the second blur.")
    blur2: BlurConfig = Field(default_factory=lambda: BlurConfig(sigma=(0.2, 1.5)), description="Second-order blur.")
    resize2: ResizeConfig = Field(
        default_factory=lambda: ResizeConfig(probabilities=(0.3, 0.4, 0.3), scale=(0.3, 1.2)), description="Second-order resize."
    )
    noise2: NoiseConfig = Field(
        default_factory=lambda: NoiseConfig(sigma=(1.0, 25.0), poisson_scale=(0.05, 2.5)), description="Second-order noise."
    )
    jpeg2: tuple[int, int] = Field((30, 95), description="Final JPEG quality range.")
    final_sinc_probability: float = Field(0.8, ge=0, le=1, description="Chance of the final sinc filter.")
    final_sinc_size: tuple[int, int] = Field((7, 21), description="Odd final sinc kernel sizes.")
    usm_target: bool = Field(True, description="USM-sharpen the target (BasicSR's train_realesrgan_x4plus: l1_gt_usm true).")
    usm_lq_source: bool = Field(True, description="Degrade the USM-sharpened HQ, as BasicSR's Real-ESRGAN model does.")
    resize_back_mode: Literal["bicubic", "bilinear", "area"] = Field("bicubic", description="Interpolation of resize_back.")


def _odd_size(bounds: tuple[int, int], rng: np.random.Generator) -> int:
    return int(rng.choice(np.arange(bounds[0], bounds[1] + 1, 2)))


def _beta(bounds: tuple[float, float], rng: np.random.Generator) -> float:
    # BasicSR draws shape parameters below or above 1 with equal chance.
    return float(rng.uniform(bounds[0], 1.0) if rng.random() < 0.5 else rng.uniform(1.0, bounds[1]))


def random_kernel(config: BlurConfig, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    size = _odd_size(config.kernel_size, rng)
    if rng.random() < config.sinc_probability:
        cutoff = float(rng.uniform(math.pi / 3, math.pi) if size < 13 else rng.uniform(math.pi / 5, math.pi))
        return kernels.sinc_kernel(size, cutoff), {"kernel": "sinc", "size": size, "cutoff": cutoff}
    kind = str(rng.choice(config.kernel_types, p=config.kernel_probabilities))
    isotropic = not kind.endswith("aniso")
    sigma_x = float(rng.uniform(*config.sigma))
    sigma_y = sigma_x if isotropic else float(rng.uniform(*config.sigma))
    theta = 0.0 if isotropic else float(rng.uniform(-math.pi, math.pi))
    params = {"kernel": kind, "size": size, "sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta}
    if kind.startswith("generalized"):
        params["beta"] = _beta(config.betag, rng)
        kernel = kernels.generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, params["beta"])
    elif kind.startswith("plateau"):
        params["beta"] = _beta(config.betap, rng)
        kernel = kernels.plateau_kernel(size, sigma_x, sigma_y, theta, params["beta"])
    else:
        kernel = kernels.gaussian_kernel(size, sigma_x, sigma_y, theta)
    return kernel, params


def kernel_from_params(params: dict) -> np.ndarray:
    """Rebuild the kernel a recorded blur op applied."""
    if params["kernel"] == "sinc":
        return kernels.sinc_kernel(params["size"], params["cutoff"])
    args = (params["size"], params["sigma_x"], params["sigma_y"], params["theta"])
    if params["kernel"].startswith("generalized"):
        return kernels.generalized_gaussian_kernel(*args, params["beta"])
    if params["kernel"].startswith("plateau"):
        return kernels.plateau_kernel(*args, params["beta"])
    return kernels.gaussian_kernel(*args)


def _random_scale(config: ResizeConfig, rng: np.random.Generator) -> float:
    direction = rng.choice(3, p=config.probabilities)
    if direction == 0:
        return float(rng.uniform(1.0, config.scale[1]))
    if direction == 1:
        return float(rng.uniform(config.scale[0], 1.0))
    return 1.0


def _random_noise(image: np.ndarray, config: NoiseConfig, rng: np.random.Generator, record: list) -> np.ndarray:
    """BasicSR's random_add_gaussian_noise_pt / random_add_poisson_noise_pt with clip=True, rounds=False, as
    RealESRGANModel calls them: the noisy image is clipped to [0, 1] before the resize, sinc and JPEG that follow."""
    gray = bool(rng.random() < config.gray_probability)
    if rng.random() < config.gaussian_probability:
        sigma = float(rng.uniform(*config.sigma))
        record.append({"op": "gaussian_noise", "sigma": sigma, "gray": gray})
        return np.clip(ops.gaussian_noise(image, sigma / 255.0, gray, rng), 0.0, 1.0)
    scale = float(rng.uniform(*config.poisson_scale))
    record.append({"op": "poisson_noise", "scale": scale, "gray": gray})
    return np.clip(ops.poisson_noise(image, scale, gray, rng), 0.0, 1.0)


def _jpeg(image: np.ndarray, quality_range: tuple[int, int], rng: np.random.Generator, record: list) -> np.ndarray:
    # A float quality, as BasicSR draws it (uniform_ over the range) for DiffJPEG; recorded to 2 decimals, applied so.
    quality = round(float(rng.uniform(quality_range[0], quality_range[1])), 2)
    record.append({"op": "jpeg", "quality": quality, "codec": "diffjpeg"})
    return ops.diffjpeg(image, quality)


def _resize_to(image: np.ndarray, height: int, width: int, rng: np.random.Generator, record: list) -> np.ndarray:
    mode = str(rng.choice(RESIZE_MODE_NAMES))
    record.append({"op": "resize", "height": int(height), "width": int(width), "mode": mode})
    return ops.resize(image, height, width, mode)


def usm_source(hq: np.ndarray) -> np.ndarray:
    """BasicSR's USM-sharpened HQ (uint8), what Real-ESRGAN degrades and trains towards. Computed once per source
    and passed to every Real-ESRGAN variant of it (`realesrgan_degrade(..., sharpened=)`)."""
    return ops.to_uint8(ops.usm_sharpen(hq))


def realesrgan_degrade(
    hq: np.ndarray, rng: np.random.Generator, config: RealESRGANConfig | None = None, sharpened: np.ndarray | None = None
) -> DegradedSample:
    """Degrade an HxWx3 uint8 RGB image. Returns the (optionally sharpened) target, the LQ, and every op applied.
    `sharpened`: `usm_source(hq)` when the caller already has it (several variants of one source)."""
    config = config or RealESRGANConfig()
    height, width = hq.shape[:2]
    target_h, target_w = max(1, height // config.scale), max(1, width // config.scale)
    record: list[dict] = []

    # BasicSR degrades the USM-sharpened ground truth (RealESRGANModel.feed_data: filter2D(self.gt_usm, kernel1)).
    if sharpened is None and (config.usm_lq_source or config.usm_target):
        sharpened = usm_source(hq)
    source = sharpened if config.usm_lq_source else hq
    kernel, params = random_kernel(config.blur1, rng)
    record.append({"op": "blur", **params})
    image = ops.blur(source, kernel)  # uint8 in, float32 out: the first (largest) blur runs in fixed point

    # BasicSR resizes by F.interpolate(scale_factor=scale): the size floored, pixels read at (x + 0.5) / scale - 0.5.
    scale = _random_scale(config.resize1, rng)
    mode = str(rng.choice(RESIZE_MODE_NAMES))
    image = ops.resize_by_scale(image, scale, mode)
    record.append({"op": "resize", "height": image.shape[0], "width": image.shape[1], "mode": mode, "scale": scale})
    image = _random_noise(image, config.noise1, rng, record)
    image = _jpeg(image, config.jpeg1, rng, record)
    first_order = len(record)

    if rng.random() < config.second_blur_probability:
        kernel, params = random_kernel(config.blur2, rng)
        record.append({"op": "blur", **params})
        image = ops.blur(image, kernel)
    scale = _random_scale(config.resize2, rng)
    image = _resize_to(image, int(height / config.scale * scale), int(width / config.scale * scale), rng, record)
    image = _random_noise(image, config.noise2, rng, record)
    second_order = len(record)

    sinc = None
    if rng.random() < config.final_sinc_probability:
        size = _odd_size(config.final_sinc_size, rng)
        cutoff = float(rng.uniform(math.pi / 3, math.pi))
        sinc = ({"op": "blur", "kernel": "sinc", "size": size, "cutoff": cutoff}, kernels.sinc_kernel(size, cutoff))
    if rng.random() < 0.5:
        image = _resize_to(image, target_h, target_w, rng, record)
        if sinc:
            record.append(sinc[0])
            image = ops.blur(image, sinc[1])
        image = _jpeg(image, config.jpeg2, rng, record)
    else:
        image = _jpeg(image, config.jpeg2, rng, record)
        image = _resize_to(image, target_h, target_w, rng, record)
        if sinc:
            record.append(sinc[0])
            image = ops.blur(image, sinc[1])
    for index, entry in enumerate(record):
        entry["stage"] = 1 if index < first_order else 2 if index < second_order else "final"
    lq = ops.clamp_round(image)
    if config.resize_back:
        record.append({"op": "resize", "stage": "resize_back", "height": height, "width": width, "mode": config.resize_back_mode})
        lq = ops.to_uint8(ops.resize(ops.to_float(lq), height, width, config.resize_back_mode))

    target = hq
    if config.usm_target:
        target = sharpened  # the same USM image BasicSR degrades and trains towards (computed once)
        record.insert(0, {"op": "usm_target", "stage": "target", "weight": 0.5, "radius": 50, "threshold": 10})
    return DegradedSample(hq=target, lq=lq, kind="realesrgan", ops=record, restoration_prompt=BLIND_PROMPT)
