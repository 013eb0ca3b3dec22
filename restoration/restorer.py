"""`Restorer`: load weights, `stage1(image)`, `caption(image)`, `restore(image, ...) -> Restoration`. The one API the
CLI, training validation, batch restore, evaluation and serving use.

Pipeline (SUPIR): the LQ image is encoded by the degradation-robust encoder (z_LQ, the stage-1 latent); without
a prompt, the preset's captioner describes the stage-1 image (decoded z_LQ); the semantic prompt (+ SUPIR's
positive quality prompt) drives the frozen UNet, the negative quality prompt is the CFG negative, and the
restoration prompt (SPIRE) enters the adaptor; the restoration-guided EDM sampler denoises; the VAE decodes; a
wavelet colour fix against the stage-1 image keeps the input's colours. With references, ReFIR's reference
chain runs at every step on each reference latent, noised with the same noise and sigma.

ABAIR: the adaptor may carry LoRA experts (one per degradation type) and the Restorer a degradation estimator;
`restore(expert_weights=...)` blends the experts with the estimator's soft weights ("soft", the default), its
arg-max ("one_hot"), or weights given by the caller (oracle: {"noise": 1.0}).

`restore` reads top to bottom, one object per phase: `stage1` (robust encoding and its decoding), the caption,
`Conditioning` (text embeddings), `ReferenceChain` (ReFIR), `AdaptedDenoiser` (the eps model the EDM loop calls),
decoding and colour fix; it returns a `Restoration` with the caption and references used, the seed, the model's
identity and per-phase seconds. Settings travel as `SamplerConfig` ([sampler]) and `RestoreConfig` ([restore]).

Weights: `save_pretrained(dir)` writes `restorer.json` (preset, adaptor config, experts, estimator) and
`model.safetensors` (adaptor with its experts, connectors, robust encoder, estimator); `from_pretrained(dir or
preset name)` rebuilds it without training code.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from restoration.captioning import caption_images
from restoration.degradations.registry import REGISTRY
from restoration.errors import InputError
from restoration.models.adaptor import AdaptedUNet, AdaptorConfig
from restoration.models.base import SDXLNetworks, encode_prompt, load_captioner, load_noise_schedule, load_sdxl, size_crop_time_ids
from restoration.models.encoder import RobustEncoder
from restoration.models.estimator import DegradationEstimator
from restoration.models.experts import add_expert, expert_names, set_expert_weights
from restoration.models.presets import load_preset
from restoration.precision import OFFLOADED, module_dtype, place, resolve_dtype, vae_dtype
from restoration.prompts import NEGATIVE_QUALITY_PROMPT, POSITIVE_QUALITY_PROMPT
from restoration.retrieval.injection import InjectionConfig, ReferenceController, install, uninstall
from restoration.sampling.colorfix import wavelet_color_fix
from restoration.sampling.edm import PerSample, SameAsFirst, StepInfo, restoration_guided_sample, schedule_sigmas
from restoration.sampling.tiled_vae import tiled_decode, tiled_encode
from restoration.sampling.tiling import tiled
from restoration.seeding import torch_seeded
from restoration.settings import RestoreConfig, SamplerConfig

CONFIG_FILE, WEIGHTS_FILE = "restorer.json", "model.safetensors"
SIZE_MULTIPLE = 64  # SUPIR's: working sizes are multiples of 64 px


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


def new_estimator(restorer: Restorer, type_ids: list[int], width: int = 32) -> DegradationEstimator:
    with torch_seeded(restorer.preset.seed, "estimator"):
        return DegradationEstimator(type_ids, width)


class Restorer:
    def __init__(
        self,
        preset_name: str,
        adaptor_config: AdaptorConfig | None = None,
        experts: dict[str, Any] | None = None,
        estimator: dict[str, Any] | None = None,
        networks: SDXLNetworks | None = None,
        dtype: torch.dtype | None = None,
    ):
        """`networks`: a frozen SDXL base built for this preset, shared with other Restorers (serving holds one base
        per replica for every model version on it; only adaptors, connectors, encoders and experts differ). The
        base is only read, except while a ReFIR chain runs (its attention processors): one restore at a time.
        `dtype`: the base is loaded straight into it (see `to` for the rest)."""
        self.preset_name = preset_name
        self.preset = load_preset(preset_name)
        self.networks = networks.frozen() if networks is not None else load_sdxl(self.preset, dtype).frozen()
        self.adaptor_config = adaptor_config or AdaptorConfig.model_validate(self.preset.adaptor or {})
        with torch_seeded(self.preset.seed, "adaptor"):
            self.model = AdaptedUNet(self.networks.unet, self.adaptor_config).eval()
        self.encoder = RobustEncoder(self.networks.vae).eval()
        self.experts: dict[str, Any] | None = None
        self.estimator: DegradationEstimator | None = None
        if experts:
            self.add_experts(experts["names"], experts.get("rank", 4))
        if estimator:
            self.set_estimator(new_estimator(self, estimator["type_ids"], estimator.get("width", 32)))
        self.alphas_cumprod = load_noise_schedule(self.preset)  # the base's training schedule ([scheduler])
        self.train_sigmas = schedule_sigmas(self.alphas_cumprod)
        self.weights: str | None = None  # the trained weights' directory (from_pretrained), None: untrained adaptor
        self._captioner = None
        self.offload = "none"  # see `to`
        self._device = torch.device("cpu")
        self.vae_factor = 2 ** (len(self.networks.vae.config.block_out_channels) - 1)  # the VAE's downsampling (8)
        # The UNet halves the latent once per down block with a downsampler (pixels also /8 for the VAE); SUPIR rounds
        # every working size to a multiple of 64 px (PIL2Tensor), which SDXL's 32 divides.
        downsamplers = sum(block.downsamplers is not None for block in self.networks.unet.down_blocks)
        self.size_multiple = max(SIZE_MULTIPLE, self.vae_factor * 2**downsamplers)

    def to(self, device: torch.device | str, dtype: str | torch.dtype | None = None, offload: str | None = None) -> Restorer:
        """Move the networks to `device` (restore() runs where they are) and, with `dtype` ("auto", "fp32", "bf16",
        "fp16" or a torch dtype; None keeps each network's), hold them in it: the UNet, adaptor, connectors and text
        encoders in `dtype`; the VAE and robust encoder too, but fp32 under fp16 (`precision.vae_dtype`); the
        estimator always fp32. `offload` (restore.offload): "model" keeps the text encoders and the captioner in CPU
        memory between their phases; "all" every network (UNet and adaptor, VAE and robust encoder too), each moved
        to the device only for its phase. On CUDA the convolutional networks use channels_last."""
        device = torch.device(device)
        if offload is not None:
            if offload not in OFFLOADED:
                raise InputError(f"offload {offload!r}: use one of {', '.join(OFFLOADED)}")
            self.offload = offload
        self._device = device
        compute = resolve_dtype(dtype, device) if dtype is not None else None
        vae = vae_dtype(self.networks.vae, compute) if compute is not None else None
        offloaded = self._offloaded()
        home = lambda module: torch.device("cpu") if module in offloaded else device  # noqa: E731
        place(self.model, home("model"), compute)  # the frozen UNet is inside the adapted model
        place(self.networks.vae, home("vae"), vae)
        place(self.encoder, home("vae"), vae)
        for encoder in (self.networks.text_encoder, self.networks.text_encoder_2):
            place(encoder, home("text"), compute)
        if self._captioner is not None:
            place(self._captioner.model, home("text"), compute)
        if self.estimator is not None:
            place(self.estimator, device, torch.float32)
        if device.type == "cuda":
            for module in (self.model, self.networks.vae, self.encoder):
                module.to(memory_format=torch.channels_last)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet and adaptor run in (inputs are cast to it, outputs back to fp32)."""
        return module_dtype(self.model)

    def _offloaded(self) -> set[str]:
        """The network groups kept in CPU memory between their phases under this offload policy."""
        return set(OFFLOADED[self.offload])

    def _modules(self, group: str) -> list[torch.nn.Module]:
        if group == "model":
            return [self.model]
        if group == "vae":
            return [self.networks.vae, self.encoder]
        return [self.networks.text_encoder, self.networks.text_encoder_2] + ([self._captioner.model] if self._captioner else [])

    @contextlib.contextmanager
    def _on_device(self, group: str) -> Iterator[None]:
        """The network group ("model", "vae", "text") on the device for the block; when `offload` keeps it in CPU
        memory, moved there before and back after."""
        if group not in self._offloaded() or self.device.type == "cpu":
            yield
            return
        modules = self._modules(group)
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")

    # ---- ABAIR experts ---------------------------------------------------------------------------------------
    def add_experts(self, names: list[str], rank: int = 4) -> None:
        """One LoRA expert per degradation type name (registry names); existing experts are kept untouched."""
        known = {degradation.name for degradation in REGISTRY.all()}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise InputError(f"unknown degradation types {unknown} for experts; known: {', '.join(sorted(known))}")
        for name in names:
            if name not in expert_names(self.model.adaptor):
                with torch_seeded(self.preset.seed, f"expert:{name}"):
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
            weights = self.estimator.weights(lq.float(), mode)[0]
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

    @staticmethod
    def preset_of(path_or_preset: str | Path) -> str:
        """The preset a weights directory (or a preset name/file) runs on, read from restorer.json alone."""
        path = weights_directory(path_or_preset)
        if path is None:
            return str(path_or_preset)
        preset = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))["preset"]
        if preset.endswith(".toml") and not Path(preset).is_absolute():
            preset = str(path / preset)  # a preset shipped with the weights (restoray convert): relative to them
        return preset

    @classmethod
    def from_pretrained(
        cls,
        path_or_preset: str | Path,
        networks: SDXLNetworks | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: str | torch.dtype | None = None,
        offload: str | None = None,
    ) -> Restorer:
        """`networks`: a shared frozen SDXL base of the same preset (see `__init__`). With `device`, the Restorer is
        moved there in `dtype` (see `to`; "auto": bf16 on CUDA, fp32 on CPU), the base read straight into that dtype."""
        compute = resolve_dtype(dtype, device or "cpu") if (device is not None or dtype is not None) else None
        path = weights_directory(path_or_preset)
        if path is None:  # a preset name or preset file: untrained adaptor
            restorer = cls(str(path_or_preset), networks=networks, dtype=compute)
        else:
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
            restorer = cls(
                cls.preset_of(path),
                AdaptorConfig.model_validate(config["adaptor"]),
                config.get("experts"),
                config.get("estimator"),
                networks=networks,
                dtype=compute,
            )
            restorer.load_trained_state(load_file(str(path / WEIGHTS_FILE)), str(path))
            restorer.weights = str(path)
        if device is not None or compute is not None:
            restorer.to(device or "cpu", compute, offload)
        return restorer

    def load_trained_state(self, state: dict[str, torch.Tensor], origin: str, partial_encoder: bool = False) -> None:
        """Load tensors named as `trained_state()` names them; `partial_encoder`: the encoder's other tensors stay."""
        model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        if unexpected or any(not k.startswith("unet.") for k in missing):
            raise InputError(f"{origin}: weights do not match the adaptor config (unexpected {unexpected[:3]}, missing {missing[:3]})")
        encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        self.encoder.load_state_dict(encoder_state, strict=not partial_encoder)
        if self.estimator is not None:
            self.estimator.load_state_dict({k.removeprefix("estimator."): v for k, v in state.items() if k.startswith("estimator.")})

    # ---- restoration -----------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What model restored an image: the preset, the weights directory (None: untrained adaptor), its experts."""
        return {"preset": self.preset_name, "weights": self.weights, "experts": (self.experts or {}).get("names", [])}

    def caption(self, image: Image.Image) -> str:
        """SUPIR's VLM caption of an image (the stage-1 image when `restore` captions), prompted as the dataset build does."""
        if self._captioner is None:
            captioner = load_captioner(self.preset.captioner, self.preset.tokenizer, seed=self.preset.seed, dtype=self.dtype)
            captioner.model.to("cpu" if "text" in self._offloaded() else self.device)
            self._captioner = captioner
        with self._on_device("text"):
            return caption_images(self._captioner, [image])[0]

    @property
    def device(self) -> torch.device:
        """Where restore() computes (`to`'s device; networks kept in CPU memory by `offload` visit it)."""
        return self._device

    def _snap(self, width: float, height: float) -> tuple[int, int]:
        """The nearest size the model takes (multiples of `size_multiple`, at least one)."""
        multiple = self.size_multiple
        return (max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple))

    def _prepare(self, image: Image.Image) -> torch.Tensor:
        size = self._snap(*image.size)
        return _to_tensor(image.resize(size, Image.BICUBIC) if size != image.size else image).to(self.device)

    def _encode(self, pixels: torch.Tensor, options: RestoreConfig) -> torch.Tensor:
        """Pixels (fp32) -> z_LQ (fp32) through the robust encoder in its own dtype."""
        pixels = pixels.to(module_dtype(self.encoder))
        if options.tile_latent is None:
            return self.encoder(pixels).float()
        factor = self.vae_factor
        encoded = tiled_encode(
            self.encoder, self.encoder.encoder, pixels, options.tile_latent * factor, options.tile_encoder_overlap, factor
        )
        return encoded.float()

    def _decode(self, latent: torch.Tensor, options: RestoreConfig) -> torch.Tensor:
        """Latent (fp32) -> pixels (fp32) through the VAE in its own dtype (fp32 under fp16: `precision`)."""
        vae = self.networks.vae
        latent = (latent / vae.config.scaling_factor).to(module_dtype(vae))
        if options.tile_latent is None:
            return vae.decode(latent).sample.float()
        return tiled_decode(vae, latent, options.tile_latent, options.tile_overlap).float()

    @torch.no_grad()
    def stage1(self, image: Image.Image, options: RestoreConfig | None = None) -> Stage1:
        """SUPIR's stage 1: the degradation-robust encoding z_LQ of the LQ image and its decoding (what is captioned
        and what the colour fix aligns to)."""
        options = options or RestoreConfig()
        lq = self._prepare(image)
        with self._on_device("vae"):
            latent = self._encode(lq, options)
            return Stage1(lq=lq, latent=latent, decoded=self._decode(latent, options), size=image.size)

    @torch.no_grad()
    def restore(
        self,
        image: Image.Image,
        prompt: str | None = None,
        references: Sequence[Image.Image | ReferenceUsed] | str = (),
        sampler: SamplerConfig | None = None,
        options: RestoreConfig | None = None,
        *,
        index=None,
        k: int | None = None,
        min_similarity: float | None = None,
        restoration_prompt: str | None = None,
        seed: int | None = None,
        expert_weights: str | dict[str, float] | None = None,
        on_step: Callable[[StepInfo], None] | None = None,
    ) -> Restoration:
        """Restore one image. `prompt` None: caption the stage-1 image. `references`: ReFIR references (images, or
        `ReferenceUsed` with the index's similarity), or "auto": the `k` nearest of the stage-1 image in `index` (a
        retrieval.references.ReferenceIndex) at or above `min_similarity` (defaults: options.retrieval_k and
        options.min_similarity; below it the image is restored without a reference and `result.retrieval` says so).
        `sampler` (the [sampler] section) and `options` (the [restore]
        section) default to their defaults; `restoration_prompt`, `seed` and `expert_weights` override `options`.
        `on_step(info)` runs after every step; `info.cancel()` stops with RestorationCancelled."""
        sampler = sampler or SamplerConfig()
        options = options or RestoreConfig()
        restoration_prompt = options.restoration_prompt if restoration_prompt is None else restoration_prompt
        seed = options.seed if seed is None else seed
        expert_weights = options.expert_weights if expert_weights is None else expert_weights
        retrieve = isinstance(references, str)
        if retrieve and (references != "auto" or index is None):
            raise InputError(f"references={references!r}: give images, or 'auto' with an index to retrieve them from")
        references = [] if retrieve else [ref if isinstance(ref, ReferenceUsed) else ReferenceUsed(ref) for ref in references]
        seconds: dict[str, float] = {}
        clock = time.perf_counter()

        output_size = (max(1, round(image.width * options.upscale)), max(1, round(image.height * options.upscale)))
        stage1 = self.stage1(self.working_image(image, output_size, options), options)
        if self.experts:
            set_expert_weights(self.model.adaptor, self.expert_weights_for(stage1.lq, expert_weights))
        seconds["stage1"], clock = _lap(clock)

        retrieval = None
        if retrieve:
            retrieval = Retrieval.search(
                index,
                stage1.image,
                options.retrieval_k if k is None else k,
                options.min_similarity if min_similarity is None else min_similarity,
            )
            references = retrieval.used
            seconds["retrieval"], clock = _lap(clock)

        caption = prompt if prompt is not None else self.caption(stage1.image)
        seconds["caption"], clock = _lap(clock)

        conditioning = self._conditioning(caption, restoration_prompt, stage1.lq.shape[2:], sampler.schedule)
        seconds["conditioning"], clock = _lap(clock)

        # Gate 0 is the plain model: no reference chain at all (bit-exact with no references).
        used = references if options.gate_scale != 0 else []
        chain = ReferenceChain.build(self, used, stage1.size, sampler, options, seed) if used else None
        seconds["references"], clock = _lap(clock)

        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(stage1.latent.shape, generator=generator).to(self.device)  # CPU draw: one image on any device
        x_center = self._guidance_target(stage1, sampler, options)
        denoiser = AdaptedDenoiser(self, stage1.latent, conditioning, chain, options)
        trajectories = {"noise": noise, "x_center": x_center, "generator": generator}
        if chain is not None:
            trajectories = {
                "noise": [noise, chain.noise],
                "x_center": [x_center, chain.x_center],
                "generator": [generator, chain.generator],
            }
            chain.install()
        try:
            with self._on_device("model"):
                latent = restoration_guided_sample(
                    denoiser,
                    trajectories["noise"],
                    self.train_sigmas,
                    sampler,
                    conditioning.semantic,
                    conditioning.negative,
                    trajectories["x_center"],
                    trajectories["generator"],
                    on_step=on_step,
                )
        finally:
            if chain is not None:
                chain.uninstall()
        if chain is not None:
            latent = latent[0]
        seconds["sampling"], clock = _lap(clock)

        restored = self._finish(latent, stage1, output_size, options)
        seconds["decode"], clock = _lap(clock)
        seconds["total"] = sum(seconds.values())
        return Restoration(
            image=restored,
            caption=caption,
            captioned=prompt is None,
            restoration_prompt=restoration_prompt,
            references=used,
            seed=seed,
            model=self.identity(),
            sampler=sampler,
            seconds=seconds,
            retrieval=retrieval,
        )

    def _finish(self, latent: torch.Tensor, stage1: Stage1, output_size: tuple[int, int], options: RestoreConfig) -> Image.Image:
        """Decode one sampled latent (1, 4, h, w), colour-fix it against its stage-1 image, resize to the output size."""
        with self._on_device("vae"):
            decoded = self._decode(latent, options)
        restored = _to_image(wavelet_color_fix(decoded, stage1.decoded))
        return restored if restored.size == output_size else restored.resize(output_size, Image.BICUBIC)

    def batch_key(self, image_size: tuple[int, int], options: RestoreConfig) -> tuple[int, int]:
        """The working size `restore` runs an image of this size at: images with the same key (and the same sampler,
        options and expert weights) can share one `restore_batch`."""
        output_size = (max(1, round(image_size[0] * options.upscale)), max(1, round(image_size[1] * options.upscale)))
        return self._working_size(output_size, options)

    def _working_size(self, output_size: tuple[int, int], options: RestoreConfig) -> tuple[int, int]:
        min_size = options.min_size or self.native_size
        scale = max(1.0, min_size / min(output_size))
        return self._snap(output_size[0] * scale, output_size[1] * scale)  # one bicubic resize, as SUPIR's PIL2Tensor

    @torch.no_grad()
    def restore_batch(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str | None] | None = None,
        sampler: SamplerConfig | None = None,
        options: RestoreConfig | None = None,
        *,
        restoration_prompts: Sequence[str | None] | None = None,
        seeds: Sequence[int | None] | None = None,
        expert_weights: str | dict[str, float] | None = None,
        on_step: Callable[[StepInfo], None] | None = None,
    ) -> list[Restoration]:
        """Restore several images with one model call per pass and step: what `restore` gives each image with the
        same prompt and seed (each sample draws its noise and churn from its own seed; stage 1, captioning and
        decoding run per image), up to the rounding of a batched forward. Every image must have the same working
        size (`batch_key`) and the same expert weights; there are no references (ReFIR runs through `restore`).
        Per-sample `prompts` (None: caption), `restoration_prompts` and `seeds` default as in `restore`."""
        count = len(images)
        if count == 0:
            return []
        sampler = sampler or SamplerConfig()
        options = options or RestoreConfig()
        prompts = list(prompts) if prompts is not None else [None] * count
        restoration_prompts = list(restoration_prompts) if restoration_prompts is not None else [None] * count
        seeds = list(seeds) if seeds is not None else [None] * count
        if not len(prompts) == len(restoration_prompts) == len(seeds) == count:
            sizes = f"{len(prompts)} prompts, {len(restoration_prompts)} restoration prompts, {len(seeds)} seeds"
            raise InputError(f"restore_batch: {count} images but {sizes}")
        restoration_prompts = [options.restoration_prompt if p is None else p for p in restoration_prompts]
        seeds = [options.seed if seed is None else seed for seed in seeds]
        expert_weights = options.expert_weights if expert_weights is None else expert_weights
        keys = {self.batch_key(image.size, options) for image in images}
        if len(keys) > 1:
            raise InputError(f"restore_batch: the images work at different sizes {sorted(keys)}; batch images of one size")
        seconds: dict[str, float] = {}
        clock = time.perf_counter()

        output_sizes = [(max(1, round(im.width * options.upscale)), max(1, round(im.height * options.upscale))) for im in images]
        stages = [self.stage1(self.working_image(im, size, options), options) for im, size in zip(images, output_sizes, strict=True)]
        if self.experts:
            weights = [self.expert_weights_for(stage.lq, expert_weights) for stage in stages]
            if any(w != weights[0] for w in weights[1:]):
                raise InputError("restore_batch: the estimator gives these images different expert weights; restore them apart")
            set_expert_weights(self.model.adaptor, weights[0])
        seconds["stage1"], clock = _lap(clock)

        captions = [prompt if prompt is not None else self.caption(stage.image) for prompt, stage in zip(prompts, stages, strict=True)]
        seconds["caption"], clock = _lap(clock)

        parts = [
            self._conditioning(caption, restoration, stage.lq.shape[2:], sampler.schedule)
            for caption, restoration, stage in zip(captions, restoration_prompts, stages, strict=True)
        ]
        conditioning = Conditioning.stack(parts)
        seconds["conditioning"], clock = _lap(clock)

        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        # Each sample's initial noise from its own seed, drawn on the CPU as `restore` draws it.
        noise = torch.cat([torch.randn(stage.latent.shape, generator=g) for stage, g in zip(stages, generators, strict=True)])
        x_center = torch.cat([self._guidance_target(stage, sampler, options) for stage in stages])
        z_lq = torch.cat([stage.latent for stage in stages])
        denoiser = AdaptedDenoiser(self, z_lq, conditioning, None, options)
        with self._on_device("model"):
            latents = restoration_guided_sample(
                denoiser,
                noise.to(self.device),
                self.train_sigmas,
                sampler,
                conditioning.semantic,
                conditioning.negative,
                x_center,
                PerSample(tuple(generators)),
                on_step=on_step,
            )
        seconds["sampling"], clock = _lap(clock)

        restored = [
            self._finish(latents[i : i + 1], stage, size, options) for i, (stage, size) in enumerate(zip(stages, output_sizes, strict=True))
        ]
        seconds["decode"], clock = _lap(clock)
        seconds["total"] = sum(seconds.values())
        return [
            Restoration(
                image=image,
                caption=caption,
                captioned=prompt is None,
                restoration_prompt=restoration,
                references=[],
                seed=seed,
                model=self.identity(),
                sampler=sampler,
                seconds=dict(seconds, batch=count),
            )
            for image, caption, prompt, restoration, seed in zip(restored, captions, prompts, restoration_prompts, seeds, strict=True)
        ]

    @property
    def native_size(self) -> int:
        """The short side the base was trained at: 8 x the UNet's sample size (1024 for SDXL)."""
        return self.vae_factor * int(self.networks.unet.config.sample_size)

    def working_image(self, image: Image.Image, output_size: tuple[int, int], options: RestoreConfig) -> Image.Image:
        """SUPIR's super-resolution: the LQ upscaled (bicubic) to the output size, and further until its short side
        reaches `min_size`, rounded to multiples of 64 px; restoration runs at that size and the result is resized to
        the output size."""
        size = self._working_size(output_size, options)
        return image if size == image.size else image.resize(size, Image.BICUBIC)

    def _guidance_target(self, stage1: Stage1, sampler: SamplerConfig, options: RestoreConfig) -> torch.Tensor:
        """What restoration guidance pulls towards. SUPIR: the stage-1 image re-encoded by the plain VAE encoder,
        E(D(z_LQ)); we take the posterior's mode (upstream draws a sample), so a seed fixes only the sampler's noise.
        diffusers schedule: z_LQ itself."""
        if sampler.schedule != "supir":
            return stage1.latent
        vae = self.networks.vae

        def plain_encode(pixels: torch.Tensor) -> torch.Tensor:
            return vae.encode(pixels.to(module_dtype(vae))).latent_dist.mode().float() * vae.config.scaling_factor

        with self._on_device("vae"):
            if options.tile_latent is None:
                return plain_encode(stage1.decoded)
            factor = self.vae_factor
            return tiled_encode(
                plain_encode, vae.encoder, stage1.decoded, options.tile_latent * factor, options.tile_encoder_overlap, factor
            )

    def _conditioning(self, caption: str, restoration_prompt: str, size_hw: tuple[int, int], schedule: str) -> Conditioning:
        # SUPIR conditions SDXL's size embedding on a fixed 1024 x 1024 whatever the image size.
        height, width = (1024, 1024) if schedule == "supir" else size_hw
        dtype = self.dtype

        def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, pooled = encode_prompt(self.networks, [prompt])
            return embeds.to(self.device, dtype), pooled.to(self.device, dtype)

        with self._on_device("text"):
            return Conditioning(
                semantic=encode(semantic_prompt(caption, schedule)),
                negative=encode(NEGATIVE_QUALITY_PROMPT),
                restoration=encode(restoration_prompt),
                # fp32: the UNet's sinusoidal projection of the sizes runs in fp32 and casts its result itself.
                time_ids=size_crop_time_ids((height, width), (0, 0), (height, width), batch=1).to(self.device),
            )


def semantic_prompt(caption: str, schedule: str) -> str:
    """The UNet's prompt: the caption and SUPIR's positive quality prompt. SUPIR joins them without a space
    (`''.join([caption, a_prompt])` in SUPIR_model.prepare_condition); the diffusers schedule keeps a space."""
    if schedule == "supir":
        return f"{caption}{POSITIVE_QUALITY_PROMPT}"
    return f"{caption} {POSITIVE_QUALITY_PROMPT}".strip()


def _lap(started: float) -> tuple[float, float]:
    now = time.perf_counter()
    return round(now - started, 4), now


@dataclass
class Stage1:
    """SUPIR's stage 1 of one image. Shapes: lq and decoded (1, 3, H, W) in [-1, 1]; latent (1, 4, H/8, W/8)."""

    lq: torch.Tensor  # the LQ image at a size the UNet takes
    latent: torch.Tensor  # z_LQ from the robust encoder
    decoded: torch.Tensor  # z_LQ decoded by the VAE
    size: tuple[int, int]  # (width, height) of the image stage 1 ran on (the working size of restore)

    @property
    def image(self) -> Image.Image:
        return _to_image(self.decoded)


@dataclass
class ReferenceUsed:
    """A ReFIR reference: the image, and where retrieval found it (similarity to the query, the index's id)."""

    image: Image.Image
    similarity: float | None = None
    source: str | None = None


@dataclass
class Restoration:
    """What `restore` did: the image and everything an index, a server or an evaluation needs to report about it."""

    image: Image.Image
    caption: str  # the semantic prompt used
    captioned: bool  # True when the caption came from the VLM (no prompt was given)
    restoration_prompt: str
    references: list[ReferenceUsed]  # those that took part (none when the gate scale is 0)
    seed: int
    model: dict[str, Any]  # Restorer.identity()
    sampler: SamplerConfig
    seconds: dict[str, float]  # per phase: stage1, (retrieval,) caption, conditioning, references, sampling, decode, total
    retrieval: Retrieval | None = None  # with references="auto": what the index returned and what was kept


@dataclass
class Retrieval:
    """references="auto": the index's candidates for the stage-1 image, and those at or above the threshold."""

    k: int
    min_similarity: float
    candidates: list[tuple[str, float]]  # (source, similarity), best first
    used: list[ReferenceUsed]
    index: str  # the index directory

    @property
    def fell_back(self) -> bool:
        """True when no candidate reached min_similarity: the image was restored without a reference."""
        return not self.used

    @classmethod
    def search(cls, index, image: Image.Image, k: int, min_similarity: float) -> Retrieval:
        found = index.query([image], k)[0]
        used = [ReferenceUsed(ref.image, ref.similarity, ref.source) for ref in found if ref.similarity >= min_similarity]
        return cls(k, min_similarity, [(ref.source, ref.similarity) for ref in found], used, str(index.directory))


@dataclass
class Conditioning:
    """Text conditioning of one restoration: (embeds (1, T, D), pooled (1, D)) pairs and SDXL's size ids (1, 6)."""

    semantic: tuple[torch.Tensor, torch.Tensor]  # caption + positive quality prompt (the UNet)
    negative: tuple[torch.Tensor, torch.Tensor]  # negative quality prompt (CFG)
    restoration: tuple[torch.Tensor, torch.Tensor]  # SPIRE restoration prompt (the adaptor)
    time_ids: torch.Tensor

    @classmethod
    def stack(cls, parts: list[Conditioning]) -> Conditioning:
        """One batch of per-sample conditionings (each of batch 1), in order."""

        def cat(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.cat([embeds for embeds, _ in pairs]), torch.cat([pooled for _, pooled in pairs])

        return cls(
            semantic=cat([part.semantic for part in parts]),
            negative=cat([part.negative for part in parts]),
            restoration=cat([part.restoration for part in parts]),
            time_ids=torch.cat([part.time_ids for part in parts]),
        )


class ReferenceChain:
    """ReFIR's reference chain: the references restored by the same adapted model (adaptor and connectors) on their
    own trajectory, next to the target's: the sampler steps them with the target (same sigmas, w, k and control
    scale), from the shared noise (the target's seed; the very same draw when the sizes match), pulled by
    restoration guidance towards their own stage-1 targets. A model call runs target and references as one batch
    when they have one shape and the target is not tiled; otherwise the references first, recording their decoder
    keys, values and joined features, then the target (tile by tile), which injects them.

    `cfg = "paired"` (upstream ReFIR: the reference on both CFG passes, as the batch [uc_t, uc_r, c_t, c_r]);
    `"shared"`: the references run on the conditional pass only, the unconditional target pass injects that record,
    and the references' trajectory takes its conditional prediction for both passes (one reference pass per step,
    not two). Outside `reference_range` nothing is injected; after its end the references stop running.
    References are restored at the working size, or scaled down to fit one diffusion tile when the target is tiled
    (every target tile then attends to whole references)."""

    def __init__(self, restorer: Restorer, references: list[Stage1], x_centers: torch.Tensor, seed: int, options: RestoreConfig):
        self.restorer = restorer
        self.z_lq = torch.cat([reference.latent for reference in references])  # (R, 4, h, w): the adaptor's LQ input
        self.x_center = x_centers
        shared_noise = torch.randn(self.z_lq[:1].shape, generator=torch.Generator().manual_seed(seed))  # the target's draw
        self.noise = shared_noise.expand_as(self.z_lq).clone().to(self.z_lq.device)
        # The churn: each step's draw of the target, as upstream ReFIR shares it (a generator of their own seeded like
        # the target's would run one draw behind it: its first draw was the initial noise).
        self.generator = SameAsFirst(fallback=torch.Generator().manual_seed(seed + 1))
        self.reference_range = options.reference_range
        self.cfg = options.refir_cfg
        self.controller = ReferenceController(InjectionConfig(gate_scale=options.gate_scale))
        self._processors: dict | None = None
        self._last_eps: torch.Tensor | None = None

    @staticmethod
    def reference_size(restorer: Restorer, working_size: tuple[int, int], options: RestoreConfig) -> tuple[int, int]:
        if options.tile_latent is None:
            return working_size
        limit = options.tile_latent * restorer.vae_factor
        scale = min(1.0, limit / max(working_size))
        return (max(1, int(working_size[0] * scale)), max(1, int(working_size[1] * scale)))

    @classmethod
    def build(
        cls,
        restorer: Restorer,
        references: list[ReferenceUsed],
        working_size: tuple[int, int],
        sampler: SamplerConfig,
        options: RestoreConfig,
        seed: int,
    ) -> ReferenceChain:
        size = cls.reference_size(restorer, working_size, options)
        stages = [restorer.stage1(reference.image.resize(size, Image.BICUBIC), options) for reference in references]
        centers = torch.cat([restorer._guidance_target(stage, sampler, options) for stage in stages])
        return cls(restorer, stages, centers, seed, options)

    def install(self) -> None:
        self._processors = dict(self.restorer.networks.unet.attn_processors)
        install(self.restorer.model, self.controller)

    def uninstall(self) -> None:
        if self._processors is not None:
            uninstall(self.restorer.model, self._processors)
            self._processors = None

    def progress(self, timestep: float) -> float:
        return 1.0 - timestep / (len(self.restorer.train_sigmas) - 1)

    def active_at(self, timestep: float) -> bool:
        return self.reference_range[0] <= self.progress(timestep) <= self.reference_range[1]

    def _forward(self, mode: str, x_in: torch.Tensor, z_lq: torch.Tensor, timestep: torch.Tensor, inputs: dict, control_scale: float):
        """One pass of the adapted model over a batch of references (and the target first, "batched"), the pass's
        text widened to the batch, with the controller recording (and injecting) as `mode` says."""
        count = x_in.shape[0]

        def widen(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.expand(count, *tensor.shape[1:])

        self.controller.clear()
        self.controller.mode, self.controller.split = mode, 1
        dtype = self.restorer.dtype
        try:
            return self.restorer.model(
                x_in.to(dtype),
                timestep[:1].expand(count),
                widen(inputs["embeds"]),
                {key: widen(value) for key, value in inputs["added"].items()},
                z_lq.to(dtype),
                widen(inputs["restoration_embeds"]),
                {key: widen(value) for key, value in inputs["restoration_added"].items()},
                control_scale,
            ).float()
        finally:
            self.controller.mode = "off"

    def run(self, x_in: torch.Tensor, timestep: torch.Tensor, model_inputs: dict, control_scale: float) -> torch.Tensor:
        """The references' eps at this step, recording what the target injects."""
        self._last_eps = self._forward("record", x_in, self.z_lq, timestep, model_inputs, control_scale)
        return self._last_eps

    def plan(self, timestep: torch.Tensor, negative: bool) -> str:
        """What the references do on this pass: "frozen" (past the range: never read again, so they stop; eps 0
        holds them still), "reuse" (shared CFG's unconditional pass: the conditional record and prediction), "run"."""
        if self.progress(float(timestep[0])) > self.reference_range[1]:
            return "frozen"
        if negative and self.cfg == "shared" and self._last_eps is not None:
            return "reuse"
        return "run"

    def step(self, x_in: torch.Tensor, timestep: torch.Tensor, model_inputs: dict, control_scale: float, plan: str) -> torch.Tensor:
        """The references' eps for one pass run apart from the target; leaves the controller ready to inject."""
        if plan == "frozen":
            self.controller.clear()
            return torch.zeros_like(x_in)
        eps = self._last_eps if plan == "reuse" else self.run(x_in, timestep, model_inputs, control_scale)
        self.controller.mode = "inject" if self.active_at(float(timestep[0])) else "off"
        return eps

    def run_with_target(
        self,
        target_in: torch.Tensor,
        target_lq: torch.Tensor,
        x_in: torch.Tensor,
        timestep: torch.Tensor,
        model_inputs: dict,
        control_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target and references as one batch [target, references] (same shape, untiled, injecting):
        (target eps, references eps)."""
        stacked, lq = torch.cat([target_in, x_in]), torch.cat([target_lq, self.z_lq])
        eps = self._forward("batched", stacked, lq, timestep, model_inputs, control_scale)
        self._last_eps = eps[1:]
        return eps[:1], eps[1:]


class AdaptedDenoiser:
    """The eps model the sampler calls: the adapted UNet on (x, z_LQ), in Gaussian-weighted tiles above
    `tile_latent`. With a reference chain it takes and returns [target, references] (the chain's trajectory)."""

    def __init__(
        self,
        restorer: Restorer,
        z_lq: torch.Tensor,
        conditioning: Conditioning,
        chain: ReferenceChain | None,
        options: RestoreConfig,
    ):
        self.model = restorer.model
        self.dtype = restorer.dtype
        self.adaptor_condition = restorer.adaptor_config.condition
        self.z_lq = z_lq
        self.conditioning = conditioning
        self.chain = chain
        self.tile_latent, self.tile_overlap = options.tile_latent, options.tile_overlap

    def model_inputs(self, cond) -> dict:
        embeds, pooled = cond
        added = {"text_embeds": pooled, "time_ids": self.conditioning.time_ids}
        if self.adaptor_condition == "semantic":  # SUPIR: the adaptor reads this pass's own prompt
            return {"embeds": embeds, "added": added, "restoration_embeds": embeds, "restoration_added": added}
        restoration_embeds, restoration_pooled = self.conditioning.restoration  # SPIRE: the restoration prompt
        restoration_added = {"text_embeds": restoration_pooled, "time_ids": self.conditioning.time_ids}
        return {"embeds": embeds, "added": added, "restoration_embeds": restoration_embeds, "restoration_added": restoration_added}

    def __call__(self, x_in, timestep: torch.Tensor, cond, control_scale: float):
        inputs = self.model_inputs(cond)
        if self.chain is None:
            return self.target(x_in, timestep, inputs, control_scale)
        target_in, references_in = x_in
        plan = self.chain.plan(timestep, negative=cond is self.conditioning.negative)
        try:
            # One batch only while injecting: outside the range the target runs alone, bit-exact with no references
            # (a batch of two rounds differently from a batch of one).
            batchable = not self.tiles(target_in) and target_in.shape[1:] == references_in.shape[1:]
            if plan == "run" and batchable and self.chain.active_at(float(timestep[0])):
                return list(self.chain.run_with_target(target_in, self.z_lq, references_in, timestep, inputs, control_scale))
            references_eps = self.chain.step(references_in, timestep, inputs, control_scale, plan)
            return [self.target(target_in, timestep, inputs, control_scale), references_eps]
        finally:
            self.chain.controller.mode = "off"

    def tiles(self, x_in: torch.Tensor) -> bool:
        return self.tile_latent is not None and max(x_in.shape[2:]) > self.tile_latent

    def target(self, x_in: torch.Tensor, timestep: torch.Tensor, inputs: dict, control_scale: float) -> torch.Tensor:
        def denoise(stacked: torch.Tensor) -> torch.Tensor:
            # x and z_LQ travel together so that every tile sees its own part of the LQ latent.
            # The latents are fp32 (the sampler's arithmetic); the model runs in its dtype, its eps comes back fp32.
            x_tile, lq_tile = stacked.to(self.dtype).chunk(2, dim=1)
            return self.model(
                x_tile,
                timestep,
                inputs["embeds"],
                inputs["added"],
                lq_tile,
                inputs["restoration_embeds"],
                inputs["restoration_added"],
                control_scale,
            ).float()

        stacked = torch.cat([x_in, self.z_lq], dim=1)
        return tiled(denoise, stacked, self.tile_latent, self.tile_overlap) if self.tiles(x_in) else denoise(stacked)
