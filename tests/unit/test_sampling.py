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
    config = SamplerConfig(schedule="diffusers", steps=6, s_churn=0.0, cfg=1.0, cfg_start=None, tau_r=None)
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
    config = SamplerConfig(schedule="diffusers", steps=8, tau_r=2.0, guidance_floor=0.5, cfg=3.0, cfg_start=1.5)
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
    with pytest.raises(ValueError, match="needs x_center"):
        restoration_guided_sample(eps, torch.zeros(1, 4, 8, 8), train_sigmas, config, cond, negative)


def _supir_reference(eps, noise, alphas_cumprod, config, cond, uncond, x_center, churn_noise):
    """SUPIR's RestoreEDMSampler (sgm EDMSampler + LegacyDDPMDiscretization + DiscreteDenoiser with quantised sigma and
    c_noise, EpsScaling, LinearCFG), re-expressed plainly from the upstream code; returns (x, ks, ws)."""
    import numpy as np

    ac = alphas_cumprod.double().numpy()
    timesteps = np.linspace(len(ac) - 1, 0, config.steps, endpoint=False).astype(int)[::-1]  # generate_roughly_equally_spaced_steps
    sigmas = torch.flip(torch.tensor((1 - ac[timesteps]) / ac[timesteps]) ** 0.5, (0,))
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])  # append_zero
    all_sigmas = torch.tensor((1 - ac) / ac) ** 0.5
    sigma_max = float(all_sigmas.max())
    x = noise.double() * torch.sqrt(1.0 + sigmas[0] ** 2.0)  # prepare_sampling_loop
    ks, ws = [], []
    num_sigmas = len(sigmas)
    for i in range(num_sigmas - 1):
        sigma, next_sigma = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(config.s_churn / (num_sigmas - 1), 2**0.5 - 1) if config.s_tmin <= sigma <= config.s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:
            x = x + churn_noise[i].double() * config.s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        control = config.control_scale
        if config.control_scale_start is not None:  # use_linear_control_scale
            control = (sigma / sigma_max) * (config.control_scale_start - config.control_scale) + config.control_scale
        index = int((all_sigmas - sigma_hat).abs().argmin())  # sigma_to_idx
        quantised = float(all_sigmas[index])

        def denoise(c, x=x, quantised=quantised, index=index, control=control):
            c_in, c_out = 1 / (quantised**2 + 1.0) ** 0.5, -quantised
            return eps((x * c_in).float(), torch.tensor([float(index)]), c, control).double() * c_out + x

        x_u, x_c = denoise(uncond), denoise(cond)
        w = config.cfg if config.cfg_start is None else (sigma_hat / sigma_max) * (config.cfg_start - config.cfg) + config.cfg
        denoised = x_u + w * (x_c - x_u)
        k = 0.0
        if next_sigma > config.guidance_floor and config.tau_r is not None:
            k = (sigma / sigma_max) ** config.tau_r
            denoised = denoised - (denoised - x_center.double()) * k
        ks.append(k)
        ws.append(w)
        d = (x - denoised) / sigma_hat
        x = x + d * (next_sigma - sigma_hat)
    return x.float(), ks, ws


def _analytic_eps(x_in, timestep, cond, control_scale):
    # A smooth denoiser that depends on every input the sampler hands it.
    return torch.tanh(x_in) * cond[0] + cond[1] * control_scale * (timestep.view(-1, 1, 1, 1) / 1000.0) + 0.01 * x_in**2


@pytest.mark.parametrize("preset", ["supir-paper", "supir-release"])
@pytest.mark.parametrize("churn", [True, False])
def test_supir_schedule_is_restore_edm_sampler_step_for_step(preset, churn):
    from diffusers import DDPMScheduler

    from restoration.sampling.presets import sampler_preset

    fields = {**sampler_preset(preset), "steps": 12, "control_scale_start": 0.3}
    if not churn:
        fields["s_churn"] = 0.0
    if not fields.get("tau_r"):
        fields["tau_r"] = 4.0  # supir-release turns guidance off; check k anyway
    config = SamplerConfig(**fields)
    alphas_cumprod = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    train_sigmas = schedule_sigmas(alphas_cumprod)
    noise = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    x_center = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    cond, uncond = (0.9, 0.3), (0.5, -0.2)
    seen = []
    ours = restoration_guided_sample(
        _analytic_eps, noise, train_sigmas, config, cond, uncond, x_center, torch.Generator().manual_seed(5), on_step=seen.append
    )
    churn_generator = torch.Generator().manual_seed(5)
    churn_noise = [torch.randn(noise.shape, generator=churn_generator) for _ in range(config.steps)]
    reference, ks, ws = _supir_reference(_analytic_eps, noise, alphas_cumprod, config, cond, uncond, x_center, churn_noise)
    assert all(0 <= step.k <= 1 for step in seen) and ks[0] > 0.9  # k at the pre-churn sigma: never past the LQ latent
    assert [step.k for step in seen] == pytest.approx(ks, rel=1e-9, abs=1e-12)
    assert [step.cfg_scale for step in seen] == pytest.approx(ws, rel=1e-6)
    if churn:
        assert seen[0].cfg_scale < config.cfg_start  # SUPIR's linear CFG at sigma-hat > sigma_max: below its start
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


def test_a_same_as_first_trajectory_takes_the_first_ones_churn_draw_at_every_step(tiny_eps):
    """ReFIR's references share the target's churn noise step by step (upstream draws it once for both)."""
    from restoration.sampling.edm import SameAsFirst

    *_, scheduler = tiny_eps
    train_sigmas = schedule_sigmas(scheduler.alphas_cumprod)
    config = SamplerConfig(schedule="diffusers", steps=4, s_churn=4.0, s_tmin=0.0, s_tmax=1e9, cfg=1.0, cfg_start=None, tau_r=None)
    x_center = torch.zeros(1, 4, 8, 8)

    def run(reference_generator):
        target_generator = torch.Generator().manual_seed(7)
        noise = torch.randn(1, 4, 8, 8, generator=target_generator)  # the target's initial noise, drawn as the Restorer does
        seen = []

        def eps_model(xs, timestep, cond, control_scale):  # x0 = x: what moves the trajectories is the churn alone
            seen.append([x.clone() for x in xs])
            return [torch.zeros_like(x) for x in xs]

        references = noise.expand(2, -1, -1, -1).clone()
        restoration_guided_sample(eps_model, [noise, references], train_sigmas, config, None, None,
                                  [x_center, x_center.expand(2, -1, -1, -1)], [target_generator, reference_generator])  # fmt: skip
        return seen

    shared = run(SameAsFirst(fallback=torch.Generator().manual_seed(99)))
    assert len(shared) == 4
    for target, references in shared:  # the inputs stay equal step by step: every churn draw was the target's
        assert torch.equal(references[0], target[0]) and torch.equal(references[1], target[0])
    own = run(torch.Generator().manual_seed(7))  # a generator seeded like the target's: one draw behind it
    assert not torch.equal(own[0][1][0], own[0][0][0])
    with pytest.raises(ValueError, match="first trajectory draws its own churn"):
        restoration_guided_sample(lambda *a: None, [x_center], train_sigmas, config, None, None, [x_center], [SameAsFirst(None)])


# SUPIR's own defaults, read from its code and paper (github.com/Fanghua-Yu/SUPIR): test.py's argparse defaults at
# 339641e (--edm_steps 50, --s_stage1 -1, --s_churn 5, --s_noise 1.003, --s_cfg 7.5, --linear_CFG True with
# --spt_linear_CFG 4.0, --s_stage2 1.0, --linear_s_stage2 False), and the paper's sampler (section 4.1: 100 steps,
# CFG 7.5, tau_r 4) with the code's CFG start and churn.
SUPIR_DEFAULTS = {
    "supir-release": {"schedule": "supir", "steps": 50, "tau_r": None, "s_churn": 5.0, "s_noise": 1.003, "cfg": 7.5,
                      "cfg_start": 4.0, "control_scale": 1.0, "control_scale_start": None},
    "supir-paper": {"schedule": "supir", "steps": 100, "tau_r": 4.0, "s_churn": 5.0, "s_noise": 1.003, "cfg": 7.5,
                    "cfg_start": 4.0, "control_scale": 1.0, "control_scale_start": None},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SUPIR_DEFAULTS))
def test_each_sampler_preset_loaded_as_the_cli_does_equals_supirs_defaults(name):
    from restoration.sampling.presets import list_sampler_presets, with_sampler_preset
    from restoray.config import load_config

    assert set(list_sampler_presets()) == set(SUPIR_DEFAULTS)  # a new preset needs its facts here
    sampler = SamplerConfig(**with_sampler_preset(load_config(None, []).sampler, name))
    assert {field: getattr(sampler, field) for field in SUPIR_DEFAULTS[name]} == SUPIR_DEFAULTS[name]


def test_tau_r_of_zero_or_less_turns_restoration_guidance_off():
    assert SamplerConfig(tau_r=0).tau_r is None and SamplerConfig(tau_r=-1).tau_r is None and SamplerConfig(tau_r=2.0).tau_r == 2.0
