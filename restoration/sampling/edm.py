"""Restoration-guided EDM sampling (SUPIR), written out as one readable loop.

The UNet predicts noise (epsilon) on its discrete DDPM schedule. As a denoiser at noise level sigma:
    x_in = x / sqrt(sigma^2 + 1),  t = the schedule's timestep for sigma (log-sigma interpolation),
    x0_hat = x - sigma * eps(x_in, t).
Each step (Karras et al.'s EDM, Euler):
1. churn: sigma_hat = sigma (1 + gamma), gamma = min(s_churn / N, sqrt(2) - 1) inside [s_tmin, s_tmax];
   x_hat = x + sqrt(sigma_hat^2 - sigma^2) * s_noise * noise;
2. x0 with classifier-free guidance: x0 = x0_neg + w_i (x0_pos - x0_neg), w_i linear from `cfg_start` at the
   first step to `cfg` at the last (SUPIR's linear CFG), w = 1 skips the negative pass;
3. restoration guidance (SUPIR eq. 5): while sigma_hat > `guidance_floor`,
   x0 = (1 - k) x0 + k z_LQ with k = (sigma_hat / sigma_max)^tau_r: early steps stay close to the LQ latent for
   fidelity, late steps are free to generate detail; `tau_r = None` turns it off;
4. Euler: x_next = x_hat + (sigma_next - sigma_hat) (x_hat - x0) / sigma_hat.
The control scale handed to the model goes linearly from `control_scale_start` to `control_scale`.
With tau_r None, s_churn 0 and cfg 1 this is exactly diffusers' EulerDiscreteScheduler on the same sigmas.

Shapes: x, z_LQ (B, C, H, W) latents.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from restoration.errors import RestorationCancelled
from restoration.settings import SamplerConfig

# eps_model(x_in, timestep, cond, control_scale) -> eps, all tensors (B, C, H, W) but the timestep (B,).
EpsModel = Callable[[torch.Tensor, torch.Tensor, Any, float], torch.Tensor]


def schedule_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) for each of the schedule's training timesteps (ascending in t)."""
    return ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt()


def step_sigmas(train_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` sigmas at evenly spaced timesteps from the last training timestep down to the first, then 0."""
    timesteps = torch.linspace(len(train_sigmas) - 1, 0, steps, dtype=torch.float64)
    positions = torch.arange(len(train_sigmas), dtype=torch.float64)
    sigmas = torch.from_numpy(np.interp(timesteps.numpy(), positions.numpy(), train_sigmas.numpy()))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def sigma_to_timestep(sigma: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """The (fractional) training timestep whose sigma is `sigma`, by interpolation in log sigma."""
    log_sigmas = train_sigmas.double().log()
    log_sigma = sigma.double().clamp(min=1e-10).log()
    low = (log_sigma >= log_sigmas[:, None]).cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
    weight = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return (1 - weight) * low + weight * (low + 1)


def timestep_to_sigma(timestep: float, train_sigmas: torch.Tensor) -> float:
    """The sigma of a (fractional) training timestep, interpolated in log sigma: the inverse of `sigma_to_timestep`."""
    log_sigmas = train_sigmas.double().log()
    low = min(int(timestep), len(log_sigmas) - 2)
    weight = timestep - low
    return float(torch.exp((1 - weight) * log_sigmas[low] + weight * log_sigmas[low + 1]))


def _linear(start: float | None, end: float, index: int, steps: int) -> float:
    if start is None or steps == 1:
        return end
    return start + (end - start) * index / (steps - 1)


@dataclass
class StepInfo:
    """What `on_step` sees after each step; `cancel()` stops sampling (`restore` then raises RestorationCancelled)."""

    index: int
    steps: int
    sigma: float
    x0_model: torch.Tensor  # x0 after CFG, before restoration guidance
    x0: torch.Tensor  # x0 used for the step
    k: float  # restoration-guidance weight (0 when off)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@torch.no_grad()
def restoration_guided_sample(
    eps_model: EpsModel,
    noise: torch.Tensor,
    train_sigmas: torch.Tensor,
    config: SamplerConfig,
    cond: Any,
    negative_cond: Any = None,
    z_lq: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sigmas: torch.Tensor | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """Sample a latent. `noise` is N(0, 1); it is scaled to the first sigma. See the module docstring."""
    if config.tau_r is not None and z_lq is None:
        raise ValueError("restoration guidance (tau_r) needs z_lq, the stage-1 latent")
    sigmas = step_sigmas(train_sigmas, config.steps) if sigmas is None else sigmas.float()
    steps = len(sigmas) - 1
    sigma_max = float(train_sigmas.max())
    x = noise * sigmas[0]
    for index in range(steps):
        sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
        gamma = min(config.s_churn / steps, math.sqrt(2) - 1) if config.s_tmin <= sigma <= config.s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            # Drawn on the generator's device (CPU by default), so a seed gives the same noise on any device.
            churn = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = x + churn * config.s_noise * math.sqrt(sigma_hat**2 - sigma**2)
        x_in = x / math.sqrt(sigma_hat**2 + 1)
        timestep = sigma_to_timestep(torch.tensor([sigma_hat]), train_sigmas).to(x.device, torch.float32).expand(x.shape[0])
        control_scale = _linear(config.control_scale_start, config.control_scale, index, steps)
        x0 = x - sigma_hat * eps_model(x_in, timestep, cond, control_scale)
        scale = _linear(config.cfg_start, config.cfg, index, steps)
        if scale != 1.0:
            if negative_cond is None:
                raise ValueError("cfg > 1 needs negative_cond")
            x0_negative = x - sigma_hat * eps_model(x_in, timestep, negative_cond, control_scale)
            x0 = x0_negative + scale * (x0 - x0_negative)
        x0_model, k = x0, 0.0
        if config.tau_r is not None and sigma_hat > config.guidance_floor:
            k = (sigma_hat / sigma_max) ** config.tau_r
            x0 = (1 - k) * x0 + k * z_lq
        if on_step is not None:
            info = StepInfo(index, steps, sigma_hat, x0_model, x0, k)
            on_step(info)
            if info.cancelled:
                raise RestorationCancelled(f"sampling cancelled by the step callback after step {index + 1} of {steps}")
        x = x + (sigma_next - sigma_hat) * (x - x0) / sigma_hat
    return x
