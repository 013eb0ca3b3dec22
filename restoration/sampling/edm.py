"""Restoration-guided EDM sampling (SUPIR), written out as one readable loop, in two schedules.

The UNet predicts noise (epsilon) on its discrete DDPM schedule. As a denoiser at noise level sigma:
    x_in = x / sqrt(sigma^2 + 1),  x0_hat = x - sigma * eps(x_in, t(sigma)).
Each step (Karras et al.'s EDM, Euler), sigma -> sigma_next:
1. churn: sigma_hat = sigma (1 + gamma), gamma = min(s_churn / N, sqrt(2) - 1) inside [s_tmin, s_tmax];
   x_hat = x + sqrt(sigma_hat^2 - sigma^2) * s_noise * noise;
2. x0 with classifier-free guidance: x0 = x0_neg + w (x0_pos - x0_neg) (SUPIR's linear CFG);
3. restoration guidance (SUPIR eq. 5): x0 = (1 - k) x0 + k x_center, k = (sigma / sigma_max)^tau_r: early steps
   stay close to the LQ latent for fidelity, late steps are free to generate detail; `tau_r = None` turns it off;
4. Euler: x_next = x_hat + (sigma_next - sigma_hat) (x_hat - x0) / sigma_hat.

`schedule = "supir"` is SUPIR's RestoreEDMSampler (sgm's EDMSampler + LegacyDDPMDiscretization + DiscreteDenoiser):
- sigmas at the integer timesteps floor(linspace(T-1, 0, N, endpoint=False)), then 0; x starts at
  noise * sqrt(1 + sigma_0^2);
- the denoiser quantises sigma_hat to the nearest training sigma and uses that sigma and its timestep index;
- w = cfg + (cfg_start - cfg) * sigma_hat / sigma_max (it may fall below 1; the negative pass always runs);
- k and the linear control scale use the step's sigma before churn (so k <= 1), and guidance applies while
  sigma_next > guidance_floor.
`schedule = "diffusers"`: sigmas at fractional timesteps linspace(T-1, 0, N), x starts at noise * sigma_0, the
denoiser interpolates the timestep of sigma_hat in log sigma, w and the control scale go linearly with the step index
(w = 1 skips the negative pass), k uses sigma_hat while sigma_hat > guidance_floor. With tau_r None, s_churn 0 and
cfg 1 this is exactly diffusers' EulerDiscreteScheduler on the same sigmas.

Shapes: x, x_center (B, C, H, W) latents.
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


def step_sigmas(train_sigmas: torch.Tensor, steps: int, schedule: str = "diffusers") -> torch.Tensor:
    """`steps` descending sigmas, then 0: at SUPIR's integer timesteps (sgm's LegacyDDPMDiscretization) or at evenly
    spaced fractional timesteps from the last training timestep down to the first (diffusers)."""
    if schedule == "supir":
        timesteps = np.linspace(len(train_sigmas) - 1, 0, steps, endpoint=False).astype(int)  # descending
        # float64, so the first sigma is exactly sigma_max and k = (sigma / sigma_max)^tau_r never exceeds 1.
        return torch.cat([train_sigmas[torch.from_numpy(timesteps)].double(), torch.zeros(1, dtype=torch.float64)])
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


def quantize_sigma(sigma: float, train_sigmas: torch.Tensor) -> tuple[float, int]:
    """(the nearest training sigma, its timestep index): sgm's DiscreteDenoiser with quantised sigma and c_noise."""
    index = int((train_sigmas - sigma).abs().argmin())
    return float(train_sigmas[index]), index


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


@dataclass(frozen=True)
class PerSample:
    """One generator per sample of a batched trajectory (`restore_batch`): sample i's churn noise comes from its own
    generator, so a batch draws exactly what single-image runs with the same seeds draw."""

    generators: tuple[torch.Generator, ...]


@dataclass(frozen=True)
class SameAsFirst:
    """A later trajectory's churn is the first trajectory's draw of the step (ReFIR: target and references share each
    step's noise, as they share the initial noise), broadcast over its samples; when its latent shape differs from the
    first's (references scaled to fit a tile of a tiled target) it draws from `fallback` instead."""

    fallback: torch.Generator


def _randn(shape: torch.Size, generator: torch.Generator | PerSample | None, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(generator, PerSample):
        if len(generator.generators) != shape[0]:
            raise ValueError(f"{len(generator.generators)} generators for a batch of {shape[0]}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype) for g in generator.generators])
    return torch.randn(shape, generator=generator, dtype=dtype)


@dataclass
class StepInfo:
    """What `on_step` sees after each step; `cancel()` stops sampling (`restore` then raises RestorationCancelled)."""

    index: int
    steps: int
    sigma: float  # sigma_hat, the step's noise level after churn
    x0_model: torch.Tensor  # x0 after CFG, before restoration guidance
    x0: torch.Tensor  # x0 used for the step
    k: float  # restoration-guidance weight (0 when off)
    cfg_scale: float = 1.0  # w of this step
    control_scale: float = 1.0
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@torch.no_grad()
def restoration_guided_sample(
    eps_model: EpsModel,
    noise: torch.Tensor | list[torch.Tensor],
    train_sigmas: torch.Tensor,
    config: SamplerConfig,
    cond: Any,
    negative_cond: Any = None,
    x_center: torch.Tensor | list[torch.Tensor] | None = None,
    generator: torch.Generator | PerSample | list[torch.Generator | PerSample | SameAsFirst | None] | None = None,
    sigmas: torch.Tensor | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Sample a latent. `noise` is N(0, 1), scaled to the first sigma; `x_center` is what restoration guidance pulls
    towards (SUPIR: the stage-1 latent). See the module docstring for the two schedules.

    Several trajectories at once (ReFIR's reference chain next to the target): `noise`, `x_center` and `generator`
    as lists, one entry per trajectory (their shapes may differ); `eps_model` then takes and returns lists, and the
    sampled latents come back as a list. Every trajectory gets the same step sigmas, churn, w, k and control scale;
    each draws its churn noise from its own generator, so the first one's draws do not depend on the others, or
    (`SameAsFirst`) takes the first one's draw.
    A batch of independent samples in one trajectory: `generator=PerSample(...)`, one generator per sample.
    `on_step` sees the first trajectory."""
    if config.tau_r is not None and x_center is None:
        raise ValueError("restoration guidance (tau_r) needs x_center, the stage-1 latent")
    supir = config.schedule == "supir"
    if (supir or config.cfg != 1.0 or config.cfg_start not in (None, 1.0)) and negative_cond is None:
        raise ValueError("classifier-free guidance needs negative_cond")
    several = isinstance(noise, list | tuple)
    noises = list(noise) if several else [noise]
    centers = list(x_center) if isinstance(x_center, list | tuple) else [x_center] * len(noises)
    generators = list(generator) if isinstance(generator, list | tuple) else [generator] * len(noises)
    if not len(noises) == len(centers) == len(generators):
        raise ValueError(f"{len(noises)} noises, {len(centers)} guidance targets and {len(generators)} generators")
    if isinstance(generators[0], SameAsFirst):
        raise ValueError("the first trajectory draws its own churn: SameAsFirst is for the ones after it")

    def model(xs: list[torch.Tensor], timestep: torch.Tensor, conditioning: Any, control_scale: float) -> list[torch.Tensor]:
        if several:
            return list(eps_model(xs, timestep, conditioning, control_scale))
        return [eps_model(xs[0], timestep, conditioning, control_scale)]

    sigmas = step_sigmas(train_sigmas, config.steps, config.schedule) if sigmas is None else sigmas
    steps = len(sigmas) - 1
    sigma_max = float(train_sigmas.max())
    xs = [n * (math.sqrt(1 + float(sigmas[0]) ** 2) if supir else float(sigmas[0])) for n in noises]
    for index in range(steps):
        sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
        gamma = min(config.s_churn / steps, math.sqrt(2) - 1) if config.s_tmin <= sigma <= config.s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            # Drawn on the generator's device (CPU by default), so a seed gives the same noise on any device.
            draws: list[torch.Tensor] = []
            for x, g in zip(xs, generators, strict=True):
                if isinstance(g, SameAsFirst):
                    first = draws[0]
                    same_shape = first.shape[1:] == x.shape[1:]
                    draws.append(first[:1].expand(x.shape) if same_shape else _randn(x.shape, g.fallback, x.dtype))
                else:
                    draws.append(_randn(x.shape, g, x.dtype))
            xs = [x + draw.to(x.device) * config.s_noise * math.sqrt(sigma_hat**2 - sigma**2) for x, draw in zip(xs, draws, strict=True)]

        device, batch = xs[0].device, xs[0].shape[0]
        if supir:
            model_sigma, timestep_index = quantize_sigma(sigma_hat, train_sigmas)
            timestep = torch.full((batch,), float(timestep_index), device=device)
            control_scale = _linear_in_sigma(config.control_scale_start, config.control_scale, sigma, sigma_max)
            scale = _linear_in_sigma(config.cfg_start, config.cfg, sigma_hat, sigma_max)
        else:
            model_sigma = sigma_hat
            timestep = sigma_to_timestep(torch.tensor([sigma_hat]), train_sigmas).to(device, torch.float32).expand(batch)
            control_scale = _linear(config.control_scale_start, config.control_scale, index, steps)
            scale = _linear(config.cfg_start, config.cfg, index, steps)
        x_ins = [x / math.sqrt(model_sigma**2 + 1) for x in xs]
        x0s = [x - model_sigma * eps for x, eps in zip(xs, model(x_ins, timestep, cond, control_scale), strict=True)]
        if supir or scale != 1.0:
            negatives = model(x_ins, timestep, negative_cond, control_scale)
            x0s = [(x - model_sigma * eps) + scale * (x0 - (x - model_sigma * eps)) for x, x0, eps in zip(xs, x0s, negatives, strict=True)]

        x0_model, k = x0s[0], 0.0
        guided = sigma_next > config.guidance_floor if supir else sigma_hat > config.guidance_floor
        if config.tau_r is not None and guided:
            k = ((sigma if supir else sigma_hat) / sigma_max) ** config.tau_r
            x0s = [(1 - k) * x0 + k * center for x0, center in zip(x0s, centers, strict=True)]
        if on_step is not None:
            info = StepInfo(index, steps, sigma_hat, x0_model, x0s[0], k, scale, control_scale)
            on_step(info)
            if info.cancelled:
                raise RestorationCancelled(f"sampling cancelled by the step callback after step {index + 1} of {steps}")
        xs = [x + (sigma_next - sigma_hat) * (x - x0) / sigma_hat for x, x0 in zip(xs, x0s, strict=True)]
    return xs if several else xs[0]


def _linear_in_sigma(at_sigma_max: float | None, at_zero: float, sigma: float, sigma_max: float) -> float:
    """SUPIR's linear schedules: `at_zero` at sigma 0 rising (or falling) to `at_sigma_max` at sigma_max."""
    if at_sigma_max is None:
        return at_zero
    return at_zero + (at_sigma_max - at_zero) * sigma / sigma_max
