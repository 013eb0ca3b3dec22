import pytest
import torch
from diffusers import EulerDiscreteScheduler

from restoration.models.base import encode_prompt, load_sdxl, size_crop_time_ids
from restoration.models.presets import load_preset
from restoration.sampling import SamplerConfig, restoration_guided_sample, schedule_sigmas, step_sigmas


@pytest.fixture(scope="module")
def tiny_eps():
    networks = load_sdxl(load_preset("tiny")).frozen()
    embeds, pooled = encode_prompt(networks, ["a photo of a cat"])
    negative = encode_prompt(networks, ["blurry, low quality"])
    time_ids = size_crop_time_ids((64, 64), (0, 0), (64, 64), batch=1)

    def eps(x_in, timestep, cond, control_scale):
        prompt_embeds, text_embeds = cond
        out = networks.unet(
            x_in, timestep, encoder_hidden_states=prompt_embeds, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}
        )
        return out.sample

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return eps, (embeds, pooled), negative, scheduler


def test_plain_loop_matches_diffusers_euler(tiny_eps):
    eps, cond, _, scheduler = tiny_eps
    train_sigmas = schedule_sigmas(scheduler.alphas_cumprod)
    sigmas = step_sigmas(train_sigmas, 6)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    config = SamplerConfig(steps=6, s_churn=0.0, cfg=1.0, cfg_start=None, tau_r=None)
    ours = restoration_guided_sample(eps, noise, train_sigmas, config, cond)

    scheduler.set_timesteps(sigmas=sigmas.tolist())
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            x = scheduler.step(eps(model_input, t.expand(1), cond, 1.0), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


def test_restoration_guidance_pulls_x0_towards_the_lq_latent_above_the_floor(tiny_eps):
    eps, cond, negative, scheduler = tiny_eps
    train_sigmas = schedule_sigmas(scheduler.alphas_cumprod)
    z_lq = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    config = SamplerConfig(steps=8, tau_r=2.0, guidance_floor=0.5, cfg=3.0, cfg_start=1.5)
    seen = []
    restoration_guided_sample(eps, noise, train_sigmas, config, cond, negative, z_lq, torch.Generator().manual_seed(3), on_step=seen.append)
    sigma_max = float(train_sigmas.max())
    assert any(step.sigma > 0.5 for step in seen) and any(step.sigma <= 0.5 for step in seen)
    for step in seen:
        if step.sigma > 0.5:
            k = (step.sigma / sigma_max) ** 2.0
            assert step.k == pytest.approx(k)
            assert torch.allclose(step.x0, (1 - k) * step.x0_model + k * z_lq, atol=1e-6)
        else:
            assert step.k == 0.0 and torch.equal(step.x0, step.x0_model)
    # Larger tau_r means weaker guidance: k falls faster with sigma.
    assert seen[1].k < (seen[1].sigma / sigma_max) ** 1.0


def test_sampling_is_deterministic_for_a_seed(tiny_eps):
    eps, cond, negative, scheduler = tiny_eps
    train_sigmas = schedule_sigmas(scheduler.alphas_cumprod)
    z_lq = torch.zeros(1, 4, 8, 8)
    config = SamplerConfig(steps=4)

    def run(seed):
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        return restoration_guided_sample(eps, noise, train_sigmas, config, cond, negative, z_lq, torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    with pytest.raises(ValueError, match="needs z_lq"):
        restoration_guided_sample(eps, torch.zeros(1, 4, 8, 8), train_sigmas, config, cond, negative)
