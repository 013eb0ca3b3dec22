"""`Restorer`: load weights, `restore(image, ...) -> image`. The one API the CLI and serving use.

Pipeline (SUPIR): the LQ image is encoded by the degradation-robust encoder (z_LQ, the stage-1 latent); without
a prompt, the preset's captioner describes the stage-1 image (decoded z_LQ); the semantic prompt (+ SUPIR's
positive quality prompt) drives the frozen UNet, the negative quality prompt is the CFG negative, and the
restoration prompt (SPIRE) enters the adaptor; the restoration-guided EDM sampler denoises; the VAE decodes; a
wavelet colour fix against the stage-1 image keeps the input's colours. With references, ReFIR's reference
chain runs at every step on each reference latent, noised with the same noise and sigma.

ABAIR: the adaptor may carry LoRA experts (one per degradation type) and the Restorer a degradation estimator;
`restore(expert_weights=...)` blends the experts with the estimator's soft weights ("soft", the default), its
arg-max ("one_hot"), or weights given by the caller (oracle: {"noise": 1.0}).

Weights: `save_pretrained(dir)` writes `restorer.json` (preset, adaptor config, experts, estimator) and
`model.safetensors` (adaptor with its experts, connectors, robust encoder, estimator); `from_pretrained(dir or
preset name)` rebuilds it without training code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from restoration.degradations.registry import REGISTRY
from restoration.errors import InputError
from restoration.models.adaptor import AdaptedUNet, AdaptorConfig
from restoration.models.base import encode_prompt, load_captioner, load_sdxl, size_crop_time_ids
from restoration.models.encoder import RobustEncoder
from restoration.models.estimator import DegradationEstimator
from restoration.models.experts import add_expert, expert_names, set_expert_weights
from restoration.models.presets import load_preset
from restoration.prompts import BLIND_PROMPT, NEGATIVE_QUALITY_PROMPT, POSITIVE_QUALITY_PROMPT
from restoration.retrieval.injection import InjectionConfig, ReferenceController, install
from restoration.sampling.colorfix import wavelet_color_fix
from restoration.sampling.edm import SamplerConfig, StepInfo, restoration_guided_sample, schedule_sigmas
from restoration.sampling.tiled_vae import tiled_decode, tiled_encode
from restoration.sampling.tiling import tiled

CONFIG_FILE, WEIGHTS_FILE = "restorer.json", "model.safetensors"


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def _to_image(tensor: torch.Tensor) -> Image.Image:
    array = ((tensor[0].detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def weights_directory(path_or_preset: str | Path) -> Path | None:
    """The directory holding trained weights (restorer.json) at or under this path; None for a preset name/file."""
    path = Path(path_or_preset)
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        found = sorted(path.rglob(CONFIG_FILE))  # e.g. an MLflow model directory with the weights under data/
        if len(found) != 1:
            raise InputError(f"{path}: no trained weights ({CONFIG_FILE}) inside, or more than one ({len(found)})")
        path = found[0].parent
    return path if (path / CONFIG_FILE).is_file() else None


@contextlib.contextmanager
def _seeded(seed: int, name: str):
    """Initialise new trainable parts from (preset seed, part name) without touching the global RNG, so that every
    data-parallel rank (and every rerun) starts from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little"))
        yield


def new_estimator(restorer: Restorer, type_ids: list[int], width: int = 32) -> DegradationEstimator:
    with _seeded(restorer.preset.seed, "estimator"):
        return DegradationEstimator(type_ids, width)


class Restorer:
    def __init__(
        self,
        preset_name: str,
        adaptor_config: AdaptorConfig | None = None,
        experts: dict[str, Any] | None = None,
        estimator: dict[str, Any] | None = None,
    ):
        self.preset_name = preset_name
        self.preset = load_preset(preset_name)
        self.networks = load_sdxl(self.preset).frozen()
        self.adaptor_config = adaptor_config or AdaptorConfig.model_validate(self.preset.adaptor or {})
        with _seeded(self.preset.seed, "adaptor"):
            self.model = AdaptedUNet(self.networks.unet, self.adaptor_config).eval()
        self.encoder = RobustEncoder(self.networks.vae).eval()
        self.experts: dict[str, Any] | None = None
        self.estimator: DegradationEstimator | None = None
        if experts:
            self.add_experts(experts["names"], experts.get("rank", 4))
        if estimator:
            self.set_estimator(new_estimator(self, estimator["type_ids"], estimator.get("width", 32)))
        self.train_sigmas = schedule_sigmas(self.train_alphas_cumprod())
        self._captioner = None
        # The UNet halves the latent once per down block with a downsampler; pixels also /8 for the VAE.
        downsamplers = sum(block.downsamplers is not None for block in self.networks.unet.down_blocks)
        self.size_multiple = 8 * 2**downsamplers

    def train_alphas_cumprod(self) -> torch.Tensor:
        # SDXL's training schedule: scaled-linear betas 0.00085..0.012 over 1000 steps.
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        return torch.cumprod(1 - betas, dim=0)

    def to(self, device: torch.device | str) -> Restorer:
        """Move every network to `device` (training workers; restore() itself runs where the networks are)."""
        for module in (
            self.networks.unet,
            self.networks.vae,
            self.networks.text_encoder,
            self.networks.text_encoder_2,
            self.model,
            self.encoder,
        ):
            module.to(device)
        if self.estimator is not None:
            self.estimator.to(device)
        return self

    # ---- ABAIR experts ---------------------------------------------------------------------------------------
    def add_experts(self, names: list[str], rank: int = 4) -> None:
        """One LoRA expert per degradation type name (registry names); existing experts are kept untouched."""
        known = {degradation.name for degradation in REGISTRY.all()}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise InputError(f"unknown degradation types {unknown} for experts; known: {', '.join(sorted(known))}")
        for name in names:
            if name not in expert_names(self.model.adaptor):
                with _seeded(self.preset.seed, f"expert:{name}"):
                    add_expert(self.model.adaptor, name, rank=rank)
        self.experts = {"names": expert_names(self.model.adaptor), "rank": rank}

    def set_estimator(self, estimator: DegradationEstimator) -> None:
        self.estimator = estimator.eval()

    def expert_weights_for(self, lq: torch.Tensor, mode: str | dict[str, float]) -> dict[str, float]:
        """The blending weights for this LQ image: the estimator's ('soft' / 'one_hot') or the caller's (oracle)."""
        names = self.experts["names"] if self.experts else []
        if isinstance(mode, dict):
            unknown = set(mode) - set(names)
            if unknown:
                raise InputError(f"unknown experts {sorted(unknown)}; this model has: {', '.join(names) or 'none'}")
            return {name: float(mode.get(name, 0.0)) for name in names}
        if mode not in ("soft", "one_hot"):
            raise InputError(f"expert_weights must be 'soft', 'one_hot' or a dict of expert weights, got {mode!r}")
        if self.estimator is None:
            raise InputError(f"expert_weights={mode!r} needs a degradation estimator; this model has none (give oracle weights)")
        with torch.no_grad():
            weights = self.estimator.weights(lq, mode)[0]
        by_name = {REGISTRY.get(type_id).name: float(weight) for type_id, weight in zip(self.estimator.type_ids, weights, strict=True)}
        return {name: by_name.get(name, 0.0) for name in names}

    # ---- weights ---------------------------------------------------------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v for k, v in self.model.state_dict().items() if not k.startswith("unet.")}
        state.update({f"encoder.{k}": v for k, v in self.encoder.state_dict().items()})
        if self.estimator is not None:
            state.update({f"estimator.{k}": v for k, v in self.estimator.state_dict().items()})
        return {k: v.contiguous() for k, v in state.items()}

    def config(self) -> dict[str, Any]:
        estimator = None
        if self.estimator is not None:
            estimator = {"type_ids": self.estimator.type_ids, "width": self.estimator.width}
        return {"preset": self.preset_name, "adaptor": self.adaptor_config.model_dump(), "experts": self.experts, "estimator": estimator}

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config()
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(self.trained_state(), str(directory / WEIGHTS_FILE))
        return directory

    @classmethod
    def from_pretrained(cls, path_or_preset: str | Path) -> Restorer:
        path = weights_directory(path_or_preset)
        if path is None:
            return cls(str(path_or_preset))  # a preset name or preset file: untrained adaptor
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        restorer = cls(config["preset"], AdaptorConfig.model_validate(config["adaptor"]), config.get("experts"), config.get("estimator"))
        state = load_file(str(path / WEIGHTS_FILE))
        model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        missing, unexpected = restorer.model.load_state_dict(model_state, strict=False)
        if unexpected or any(not k.startswith("unet.") for k in missing):
            raise InputError(f"{path}: weights do not match the adaptor config (unexpected {unexpected[:3]}, missing {missing[:3]})")
        restorer.encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")})
        if restorer.estimator is not None:
            restorer.estimator.load_state_dict({k.removeprefix("estimator."): v for k, v in state.items() if k.startswith("estimator.")})
        return restorer

    # ---- restoration -----------------------------------------------------------------------------------------
    def caption(self, image: Image.Image) -> str:
        if self._captioner is None:
            self._captioner = load_captioner(self.preset.captioner, self.preset.tokenizer, seed=self.preset.seed)
        captioner = self._captioner
        inputs = captioner.processor(images=[image], text=[f"<image> {captioner.prompt}"], return_tensors="pt")
        with torch.no_grad():
            generated = captioner.model.generate(**inputs, max_new_tokens=captioner.max_new_tokens, do_sample=False)
        return captioner.processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()

    def _prepare(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        multiple = self.size_multiple
        size = (max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple))
        return _to_tensor(image.resize(size, Image.BICUBIC) if size != image.size else image)

    @torch.no_grad()
    def restore(
        self,
        image: Image.Image,
        prompt: str | None = None,
        restoration_prompt: str = BLIND_PROMPT,
        references: tuple[Image.Image, ...] = (),
        tau_r: float | None = 4.0,
        steps: int = 50,
        cfg: float = 7.5,
        seed: int = 0,
        control_scale: float = 1.0,
        gate_scale: float = 1.0,
        reference_range: tuple[float, float] = (0.0, 1.0),
        tile_latent: int | None = 128,
        tile_overlap: int = 32,
        tile_encoder_overlap: int = 64,
        expert_weights: str | dict[str, float] = "soft",
        on_step: Callable[[StepInfo], None] | None = None,
    ) -> Image.Image:
        """Restore one image. `reference_range` is the part of the denoising (0 = pure noise, 1 = done) in which
        ReFIR references are injected; the paper injects in the detail-restoration stage, i.e. late. Latents larger
        than `tile_latent` (128 = SDXL's 1024 px) are denoised in Gaussian-weighted overlapping tiles (tiled
        diffusion, as SUPIR does for large images) and decoded by the tiled VAE (image-wide GroupNorm statistics and
        attention; `tile_overlap` latent pixels of overlap); images larger than 8 * `tile_latent` pixels are encoded
        by the tiled VAE too, with `tile_encoder_overlap` pixels of overlap. None never tiles. `expert_weights`
        blends the LoRA experts (if the model has any): "soft" / "one_hot" from the estimator, or a dict (oracle)."""
        if steps < 1 or cfg < 1:
            raise InputError(f"steps must be >= 1 and cfg >= 1 (got steps={steps}, cfg={cfg})")
        if not 0.0 <= reference_range[0] <= reference_range[1] <= 1.0:
            raise InputError(f"reference_range must satisfy 0 <= start <= end <= 1, got {reference_range}")
        original_size = image.size
        device = next(self.model.parameters()).device  # restore runs where the networks are (see `to`)
        lq = self._prepare(image).to(device)
        vae = self.networks.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's downsampling (8)

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            if tile_latent is None:
                return self.encoder(pixels)
            return tiled_encode(self.encoder, self.encoder.encoder, pixels, tile_latent * factor, tile_encoder_overlap, factor)

        def decode(latent: torch.Tensor) -> torch.Tensor:
            latent = latent / vae.config.scaling_factor
            return vae.decode(latent).sample if tile_latent is None else tiled_decode(vae, latent, tile_latent, tile_overlap)

        if self.experts:
            set_expert_weights(self.model.adaptor, self.expert_weights_for(lq, expert_weights))
        z_lq = encode(lq)
        stage1 = decode(z_lq)
        if prompt is None:
            prompt = self.caption(_to_image(stage1))
        semantic = encode_prompt(self.networks, [f"{prompt} {POSITIVE_QUALITY_PROMPT}".strip()])
        negative = encode_prompt(self.networks, [NEGATIVE_QUALITY_PROMPT])
        restoration = encode_prompt(self.networks, [restoration_prompt])
        height, width = lq.shape[2:]
        time_ids = size_crop_time_ids((height, width), (0, 0), (height, width), batch=1).to(device)

        reference_latents = [encode(self._prepare(ref.resize(image.size, Image.BICUBIC)).to(device)) for ref in references]
        controller = ReferenceController(InjectionConfig(gate_scale=gate_scale))
        previous = dict(self.networks.unet.attn_processors)
        if reference_latents:
            install(self.networks.unet, controller)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(z_lq.shape, generator=generator).to(device)  # CPU draw: the same image on every device

        log_sigmas = self.train_sigmas.log()
        recorded_at = [float("nan")]

        def eps_model(x_in: torch.Tensor, timestep: torch.Tensor, cond, scale: float) -> torch.Tensor:
            embeds, pooled = cond
            added = {"text_embeds": pooled, "time_ids": time_ids}
            progress = 1.0 - float(timestep[0]) / (len(log_sigmas) - 1)
            use_references = bool(reference_latents) and reference_range[0] <= progress <= reference_range[1]
            if use_references and float(timestep[0]) != recorded_at[0]:
                # Reference chain: the same weights, noise and sigma as the target (sigma from the timestep), run
                # once per step; the CFG negative pass of the same step reuses what the positive pass recorded.
                t = float(timestep[0])
                recorded_at[0] = t
                low = min(int(t), len(log_sigmas) - 2)
                sigma = float(torch.exp((1 - (t - low)) * log_sigmas[low] + (t - low) * log_sigmas[low + 1]))
                controller.clear()
                controller.mode = "record"
                for reference in reference_latents:
                    x_ref = (reference + noise * sigma) / float(np.sqrt(sigma**2 + 1))
                    self.networks.unet(x_ref, timestep, encoder_hidden_states=embeds, added_cond_kwargs=added)
            if use_references:
                controller.mode = "inject"
            restoration_added = {"text_embeds": restoration[1], "time_ids": time_ids}

            def denoise(stacked: torch.Tensor) -> torch.Tensor:
                # x_in and z_LQ travel together so that every tile sees its own part of the LQ latent.
                x_tile, lq_tile = stacked.chunk(2, dim=1)
                return self.model(x_tile, timestep, embeds, added, lq_tile, restoration[0], restoration_added, scale)

            stacked = torch.cat([x_in, z_lq], dim=1)
            large = tile_latent is not None and max(x_in.shape[2:]) > tile_latent
            eps = tiled(denoise, stacked, tile_latent, tile_overlap) if large and not use_references else denoise(stacked)
            controller.mode = "off"
            return eps

        sampler = SamplerConfig(steps=steps, cfg=cfg, cfg_start=min(4.0, cfg), tau_r=tau_r, control_scale=control_scale)
        try:
            latent = restoration_guided_sample(
                eps_model, noise, self.train_sigmas, sampler, semantic, negative, z_lq, generator, on_step=on_step
            )
        finally:
            self.networks.unet.set_attn_processor(previous)
        restored = decode(latent)
        restored = wavelet_color_fix(restored, stage1)
        result = _to_image(restored)
        return result.resize(original_size, Image.BICUBIC) if result.size != original_size else result
