"""`restoray plan`: memory and FLOPs of a preset at real size, measured on the CPU without weights.

The preset's networks are built from their configs under one FakeTensorMode (`planning.configs`: local configs, the
Hugging Face cache or the packaged copies; never a download) in the plan's dtype, and each phase runs the calls the
Restorer and the training stage make, measured by `planning.measure` (FlopCounterMode with attention, MemTracker):

- restore at `size`: stage 1 (robust encoding, decoding of z_LQ, the plain VAE encoding restoration guidance pulls
  towards), the three prompts through both text encoders, one sampling step (a conditional and an unconditional
  adapted-UNet pass of batch 1, as the sampler makes them: FLOPs of two, memory of one), decoding;
- restore at 2 x size: diffusion in latent tiles of `tile_latent` (each tile one pass; the peak is one tile's), VAE
  and robust encoder at the full size: the tiled VAE keeps every tile's activations of a layer alive at once (image-wide
  GroupNorm), so its peak is the untiled one's, which is what is measured (its threads cannot run under the fake mode:
  dispatch modes are per thread);
- ReFIR with one reference at `size`: the batched pass [target, reference] through the installed processors.
  `paired` = two batched passes per step; `shared` = one batched pass + one injecting target pass, whose FLOPs are a
  plain pass plus the injection's extra (batched - 2 plain): 2 batched - 1 plain;
- the captioner in its own phase: its parameters and one prefill of the image tokens and the instruction
  (`caption_tokens` text tokens); the generated tokens' FLOPs are 2 x language-model parameters each (a formula);
- one adaptor training step at `train_size` per GPU: the adapted UNet in the training dtype (as DeepSpeed holds the
  engine module) forward and backward at batch 1 and 2 (activations per sample from the difference), with and without
  gradient checkpointing; ZeRO-2 by formula (DeepSpeed cannot run under the fake mode): the trained parameters' fp32
  masters, Adam moments and fp32 gradient partition (16 B each) over `gpus`, plus the reduce buckets
  (`reduce_bucket_size` elements, two with overlap_comm); the frozen networks held in the training dtype.

What it cannot see: cuDNN/cuBLAS workspaces, the caching allocator's fragmentation and the CUDA context (the GPU table
keeps `reserved_gib` of every card for them), kernels' own temporaries that never become tensors.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from restoration.config_model import StrictModel
from restoration.models.presets import NetworkSpec
from restoration.planning.configs import network_config
from restoration.planning.measure import Measurement, ParameterStats, fake_module, measure, parameter_stats
from restoration.precision import OFFLOADED

GPU_TABLE = Path(__file__).with_name("gpus.toml")
GiB = 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PlanConfig(StrictModel):
    """What `restoray plan` sizes (the CLI's flags)."""

    preset: str = Field("sdxl", description="Preset name or preset .toml file.")
    size: int = Field(1024, ge=64, description="Restore size in pixels (square); the tiled row is at twice this.")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="Precision of the networks (restore.dtype, train.precision).")
    gpus: int = Field(8, ge=1, description="GPUs ZeRO-2 partitions the optimizer state and gradients over.")
    steps: int = Field(50, ge=1, description="Sampling steps per image (SUPIR's default 50).")
    train_size: int = Field(512, ge=64, description="Training crop size in pixels.")
    tile_latent: int = Field(128, ge=8, description="Diffusion tile in latent pixels (restore.tile_latent).")
    tile_overlap: int = Field(64, ge=0, description="Overlap of diffusion tiles (restore.tile_overlap).")
    caption_tokens: int = Field(64, ge=1, description="Text tokens of the captioning instruction (beside the image's).")
    captioner: str | None = Field(
        None, description="Size this captioner instead of the preset's: a Hugging Face id or local directory (its config only)."
    )
    reduce_bucket_size: int = Field(500_000_000, ge=1, description="DeepSpeed's ZeRO reduce bucket, in elements (its default).")
    overlap_comm: bool = Field(True, description="DeepSpeed's overlap_comm (restoray sets it on GPUs): two reduce buckets.")


class Gpu(StrictModel):
    name: str
    memory_mib: int = Field(gt=0)
    bf16_tflops: float = Field(gt=0)
    memory_gbs: float = Field(gt=0)

    def usable_bytes(self, reserved_gib: float) -> float:
        return self.memory_mib * 2**20 - reserved_gib * GiB


def gpu_table() -> tuple[float, list[Gpu]]:
    """(reserved GiB per card, the GPUs) from the packaged table."""
    data = tomllib.loads(GPU_TABLE.read_text(encoding="utf-8"))
    return float(data["reserved_gib"]), [Gpu.model_validate(entry) for entry in data["gpu"]]


class Networks:
    """The preset's networks at full size with fake parameters, built as the Restorer builds them."""

    def __init__(self, preset_name: str, dtype: torch.dtype, captioner: str | None = None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from torch._subclasses.fake_tensor import FakeTensorMode
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from restoration.models.adaptor import AdaptedUNet, AdaptorConfig
        from restoration.models.encoder import RobustEncoder
        from restoration.models.presets import load_preset

        self.preset = preset = load_preset(preset_name)
        self.dtype = dtype
        self.mode = FakeTensorMode()
        self.adaptor_config = AdaptorConfig.model_validate(preset.adaptor or {})
        unet_config = network_config(preset.unet, f"{preset.name}.unet")
        vae_config = network_config(preset.vae, f"{preset.name}.vae")
        build = lambda factory: fake_module(factory, dtype, self.mode)  # noqa: E731
        self.unet = build(lambda: UNet2DConditionModel(**unet_config).eval().requires_grad_(False))
        self.model = build(lambda: AdaptedUNet(self.unet, self.adaptor_config).eval())
        self.vae = build(lambda: AutoencoderKL(**vae_config).eval().requires_grad_(False))
        self.encoder = build(lambda: RobustEncoder(self.vae).eval().requires_grad_(False))
        text_configs = [
            network_config(spec, f"{preset.name}.{name}")
            for name, spec in (("text_encoder", preset.text_encoder), ("text_encoder_2", preset.text_encoder_2))
        ]
        self.text_encoder = build(lambda: CLIPTextModel(CLIPTextConfig(**text_configs[0])).eval().requires_grad_(False))
        self.text_encoder_2 = build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text_configs[1])).eval().requires_grad_(False))
        captioner_spec = preset.captioner if captioner is None else NetworkSpec(source=captioner)
        self.captioner_config = network_config(captioner_spec, f"{preset.name}.captioner")
        self._captioner = None
        self.vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.latent_channels = int(vae_config.get("latent_channels", 4))
        self.text_length = int(text_configs[1].get("max_position_embeddings", 77))
        self.text_width = int(text_configs[0]["hidden_size"]) + int(text_configs[1]["hidden_size"])
        self.pooled_width = int(text_configs[1].get("projection_dim", text_configs[1]["hidden_size"]))

    @property
    def captioner(self):
        if self._captioner is None:
            from transformers import LlavaConfig, LlavaForConditionalGeneration

            config = LlavaConfig(**self.captioner_config)
            self._captioner = fake_module(lambda: LlavaForConditionalGeneration(config).eval().requires_grad_(False), self.dtype, self.mode)
        return self._captioner

    def parameters(self) -> dict[str, ParameterStats]:
        trainable = self.model.trainable_parameters()
        adaptor = parameter_stats(self.model, trainable)
        unet = parameter_stats(self.unet)
        adaptor_only = ParameterStats(adaptor.count - unet.count, adaptor.bytes - unet.bytes, adaptor.trainable, adaptor.trainable_bytes)
        return {
            "unet": unet,
            "adaptor": adaptor_only,
            "vae": parameter_stats(self.vae),
            "robust_encoder": parameter_stats(self.encoder),
            "text_encoder": parameter_stats(self.text_encoder),
            "text_encoder_2": parameter_stats(self.text_encoder_2),
            "captioner": parameter_stats(self.captioner),
        }

    # ---- the calls the Restorer makes --------------------------------------------------------------------------
    def _latent(self, batch: int, side: int) -> torch.Tensor:
        return torch.randn(batch, self.latent_channels, side, side, dtype=self.dtype)

    def _text(self, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        embeds = torch.randn(batch, self.text_length, self.text_width, dtype=self.dtype)
        added = {"text_embeds": torch.randn(batch, self.pooled_width, dtype=self.dtype), "time_ids": torch.randn(batch, 6)}
        return embeds, added

    def adapted_pass(self, batch: int, side: int) -> torch.Tensor:
        embeds, added = self._text(batch)
        return self.model(self._latent(batch, side), torch.full((batch,), 500.0), embeds, added, self._latent(batch, side), embeds, added)

    def stage1(self, pixels: int) -> None:
        with torch.no_grad():
            image = torch.randn(1, 3, pixels, pixels, dtype=self.dtype)
            latent = self.encoder(image)
            decoded = self.vae.decode(latent / self.vae.config.scaling_factor).sample
            self.vae.encode(decoded).latent_dist.mode()

    def decode(self, pixels: int) -> None:
        with torch.no_grad():
            self.vae.decode(self._latent(1, pixels // self.vae_factor))

    def conditioning(self) -> None:
        with torch.no_grad():
            tokens = torch.randint(0, 49406, (3, self.text_length))  # semantic, negative and restoration prompts
            self.text_encoder(tokens, output_hidden_states=True)
            self.text_encoder_2(tokens, output_hidden_states=True)

    def prefill(self, text_tokens: int) -> None:
        """LLaVA's prefill as its forward makes it, less the check that the image tokens match the features (a
        data-dependent branch): image features, the text's embeddings beside them, the language model, the last logit."""
        config = self.captioner.config
        vision = config.vision_config
        llava = self.captioner.model
        with torch.no_grad():
            pixels = torch.randn(1, 3, vision.image_size, vision.image_size, dtype=self.dtype)
            features = llava.get_image_features(
                pixel_values=pixels,
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
            features = features.pooler_output if hasattr(features, "pooler_output") else features  # one tensor per image
            features = torch.cat(list(features), dim=0)[None] if isinstance(features, list | tuple) else features
            text = llava.get_input_embeddings()(torch.randint(0, 1000, (1, text_tokens)))
            hidden = llava.language_model(inputs_embeds=torch.cat([features.reshape(1, -1, text.shape[-1]), text], dim=1))
            self.captioner.lm_head(hidden.last_hidden_state[:, -1:])


def _measure(networks: Networks, fn, *modules) -> Measurement:
    return measure(fn, modules, networks.mode)


# The network groups resident on the device whatever the phase, under each restore.offload (the rest visit it for
# their phase only): the complement of what `Restorer` keeps in CPU memory.
GROUPS = {offload: tuple(g for g in ("model", "vae", "text") if g not in kept) for offload, kept in OFFLOADED.items()}
OFFLOADS = tuple(GROUPS)


def _phase(name: str, workload: str, flops: float, groups: tuple[str, ...], measured: Measurement, note: str = "") -> dict[str, Any]:
    return {"phase": name, "workload": workload, "flops": int(flops), "groups": list(groups),
            "activation_bytes": int(measured.activation_bytes), "note": note}  # fmt: skip


def phase_peak(row: dict[str, Any], group_bytes: dict[str, int], offload: str) -> int:
    """A phase's peak: the networks on the device during it under `offload`, and its own activations."""
    on_device = set(row["groups"]) | set(GROUPS[offload] if row["workload"] != "caption" else ())
    return sum(group_bytes[group] for group in on_device) + row["activation_bytes"]


def tile_count(latent: int, tile: int, overlap: int) -> int:
    from restoration.sampling.tiling import tile_starts

    return len(tile_starts(latent, tile, overlap)) ** 2


def plan(config: PlanConfig, progress=None) -> dict[str, Any]:
    """Measure every phase; returns the plan as data (what `--json` prints and the tables are made from)."""
    started = time.perf_counter()
    say = progress or (lambda message: None)
    say(f"building {config.preset}'s networks at full size (fake tensors, {config.dtype})")
    nets = Networks(config.preset, DTYPES[config.dtype], config.captioner)
    params = nets.parameters()
    b = {name: stats.bytes for name, stats in params.items()}
    group_bytes = {
        "model": b["unet"] + b["adaptor"],
        "vae": b["vae"] + b["robust_encoder"],
        "text": b["text_encoder"] + b["text_encoder_2"],
        "captioner": b["captioner"],
    }
    size, big = config.size, 2 * config.size
    latent = size // nets.vae_factor
    no_grad_pass = lambda batch, side: torch.no_grad()(nets.adapted_pass)(batch, side)  # noqa: E731

    say(f"restore at {size}: stage 1, prompts, one step, decode")
    stage1 = _measure(nets, lambda: nets.stage1(size), nets.encoder, nets.vae)
    cond = _measure(nets, nets.conditioning, nets.text_encoder, nets.text_encoder_2)
    one_pass = _measure(nets, lambda: no_grad_pass(1, latent), nets.model)
    decode = _measure(nets, lambda: nets.decode(size), nets.vae)
    native, tiled, refir = f"restore {size}", f"restore {big} tiled", f"ReFIR {size}"
    rows = [
        _phase(f"{native}: stage 1", native, stage1.flops, ("vae",), stage1, "robust encode, decode, guidance encode"),
        _phase(f"{native}: prompts", native, cond.flops, ("text",), cond, "3 prompts, both text encoders"),
        _phase(f"{native}: one step", native, 2 * one_pass.flops, ("model",), one_pass, "CFG: 2 passes of batch 1"),
        _phase(f"{native}: decode", native, decode.flops, ("vae",), decode),
    ]

    say(f"restore at {big}, tiled: stage 1, one tile, decode")
    tiles = tile_count(big // nets.vae_factor, config.tile_latent, config.tile_overlap)
    tile_latent = min(config.tile_latent, big // nets.vae_factor)
    tile_pass = one_pass if tile_latent == latent else _measure(nets, lambda: no_grad_pass(1, tile_latent), nets.model)
    stage1_big = _measure(nets, lambda: nets.stage1(big), nets.encoder, nets.vae)
    decode_big = _measure(nets, lambda: nets.decode(big), nets.vae)
    rows += [
        _phase(f"{tiled}: stage 1", tiled, stage1_big.flops, ("vae",), stage1_big, "tiled VAE: peak as untiled"),
        _phase(f"{tiled}: prompts", tiled, cond.flops, ("text",), cond),
        _phase(f"{tiled}: one step", tiled, 2 * tiles * tile_pass.flops, ("model",), tile_pass, f"{tiles} tiles x 2 passes"),
        _phase(f"{tiled}: decode", tiled, decode_big.flops, ("vae",), decode_big, "tiled VAE: peak as untiled"),
    ]

    say(f"ReFIR at {size}: one batched pass [target, reference]")
    batched = _measure(nets, lambda: _refir_batched(nets, latent), nets.model)
    shared_flops = 2 * batched.flops - one_pass.flops  # batched pass + (plain pass + the injection's extra)
    rows += [
        _phase(f"{refir}: stage 1 x 2", refir, 2 * stage1.flops, ("vae",), stage1, "target and reference"),
        _phase(f"{refir}: prompts", refir, cond.flops, ("text",), cond),
        _phase(f"{refir} paired: one step", refir, 2 * batched.flops, ("model",), batched, "2 batched passes"),
        _phase(f"{refir} shared: one step", refir, shared_flops, ("model",), batched, "batched + injecting pass"),
        _phase(f"{refir}: decode", refir, decode.flops, ("vae",), decode),
    ]

    say("captioner: one prefill")
    prefill = _measure(nets, lambda: nets.prefill(config.caption_tokens), nets.captioner)
    language = sum(p.numel() for name, p in nets.captioner.named_parameters() if "language_model" in name or "lm_head" in name)
    max_new = nets.preset.captioner.max_new_tokens
    caption_flops = prefill.flops + 2 * language * max_new
    # Each generated token reads every language-model weight once: bandwidth, not FLOPs, bounds generation.
    caption_reads = max_new * language * (torch.finfo(nets.dtype).bits // 8)
    rows.append(_phase("caption (own phase)", "caption", caption_flops, ("captioner",), prefill, f"prefill + {max_new} tokens x 2 x LM"))

    say(f"one training step at {config.train_size}: batch 1 and 2, with and without gradient checkpointing")
    training = _training(nets, config, params)

    steps = config.steps
    restore_flops = {
        "native": stage1.flops + cond.flops + steps * 2 * one_pass.flops + decode.flops,
        "tiled": stage1_big.flops + cond.flops + steps * 2 * tiles * tile_pass.flops + decode_big.flops,
        "refir_paired": 2 * stage1.flops + cond.flops + steps * 2 * batched.flops + decode.flops,
        "refir_shared": 2 * stage1.flops + cond.flops + steps * shared_flops + decode.flops,
        "caption": caption_flops,
    }
    peaks = {
        workload: {
            offload: max(phase_peak(row, group_bytes, offload) for row in rows if row["workload"] == workload) for offload in OFFLOADS
        }
        for workload in (native, tiled, refir, "caption")
    }
    result = {
        "config": config.model_dump(),
        "parameters": {name: {"count": s.count, "bytes": s.bytes, "trainable": s.trainable} for name, s in params.items()},
        "group_bytes": group_bytes,
        "phases": [{**row, "peak_bytes": {offload: phase_peak(row, group_bytes, offload) for offload in OFFLOADS}} for row in rows],
        "peaks": peaks,
        "restore_flops_per_image": restore_flops,
        "step_flops": 2 * one_pass.flops,
        "caption_prefill_flops": prefill.flops,
        "caption_generation_bytes": caption_reads,
        "training": training,
        "seconds": round(time.perf_counter() - started, 1),
    }
    result["gpus"] = _fits(result)
    return result


def _refir_batched(nets: Networks, latent: int) -> None:
    """One pass of [target, reference] through ReFIR's processors, recording and injecting at once (the untiled path)."""
    from restoration.retrieval.injection import InjectionConfig, ReferenceController, install, uninstall

    processors = dict(nets.unet.attn_processors)
    controller = ReferenceController(InjectionConfig())
    install(nets.model, controller)
    controller.mode, controller.split = "batched", 1
    try:
        with torch.no_grad():
            nets.adapted_pass(2, latent)
    finally:
        controller.mode = "off"
        controller.clear()
        uninstall(nets.model, processors)


def _training(nets: Networks, config: PlanConfig, params: dict[str, ParameterStats]) -> dict[str, Any]:
    """One adaptor step per GPU at batch 1 and 2, with and without gradient checkpointing; ZeRO-2 by formula."""
    from restoration.models.adaptor import enable_gradient_checkpointing

    latent = config.train_size // nets.vae_factor
    trainable = nets.model.trainable_parameters()
    for parameter in trainable:
        parameter.requires_grad_(True)
    # ZeRO-2 copies each gradient into a reduce bucket as it is accumulated and frees it: modelled by dropping it (the
    # buckets are added by formula), so the measured peak is parameters + activations.
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in trainable]
    nets.model.train()

    def step(batch: int) -> None:
        eps = nets.adapted_pass(batch, latent)
        torch.nn.functional.mse_loss(eps.float(), torch.randn(eps.shape)).backward()

    rows = {}
    try:
        for checkpointing in (False, True):
            enable_gradient_checkpointing(nets.model, checkpointing)
            one, two = (_measure(nets, lambda batch=batch: step(batch), nets.model) for batch in (1, 2))
            per_sample = max(0, two.activation_bytes - one.activation_bytes)
            rows["checkpointing" if checkpointing else "plain"] = {
                "flops_per_sample": two.flops - one.flops,
                "activation_bytes_per_sample": per_sample,
                "activation_bytes_base": max(0, one.activation_bytes - per_sample),
            }
    finally:
        for hook in hooks:
            hook.remove()
        enable_gradient_checkpointing(nets.model, False)
        nets.model.eval()
        for parameter in trainable:
            parameter.requires_grad_(False)
    trained = sum(p.numel() for p in trainable)
    element = torch.finfo(nets.dtype).bits // 8
    return {
        "trainable_parameters": trained,
        # every network but the captioner, in the training dtype (the engine module's trained parameters included)
        "resident_bytes": sum(stats.bytes for name, stats in params.items() if name != "captioner"),
        "bucket_bytes": (2 if config.overlap_comm else 1) * config.reduce_bucket_size * element,
        "optimizer_bytes": 16 * trained // config.gpus,  # fp32 master 4 + Adam moments 8 + fp32 gradient partition 4
        "steps": rows,
    }


def training_peak(training: dict[str, Any], mode: str, batch: int) -> int:
    row = training["steps"][mode]
    fixed = training["resident_bytes"] + training["bucket_bytes"] + training["optimizer_bytes"]
    return fixed + row["activation_bytes_base"] + batch * row["activation_bytes_per_sample"]


def largest_batch(training: dict[str, Any], mode: str, usable: float) -> int:
    """The largest batch per GPU whose step peak fits `usable` bytes (0: not even one sample)."""
    per_sample = max(1, training["steps"][mode]["activation_bytes_per_sample"])
    return max(0, int((usable - training_peak(training, mode, 0)) // per_sample))


def _fits(result: dict[str, Any]) -> list[dict[str, Any]]:
    reserved, gpus = gpu_table()
    out = []
    for gpu in gpus:
        usable = gpu.usable_bytes(reserved)
        rate = gpu.bf16_tflops * 1e12
        fits = {workload: [offload for offload in OFFLOADS if peak[offload] <= usable] for workload, peak in result["peaks"].items()}
        out.append(
            {
                "gpu": gpu.name,
                "memory_gib": round(gpu.memory_mib / 1024, 1),
                "fits": fits,  # workload -> the offload policies it fits with
                "seconds_per_step": result["step_flops"] / rate,
                "seconds_per_image": {
                    **{key: flops / rate for key, flops in result["restore_flops_per_image"].items()},
                    "caption": result["caption_prefill_flops"] / rate + result["caption_generation_bytes"] / (gpu.memory_gbs * 1e9),
                },
                "train_batch": {mode: largest_batch(result["training"], mode, usable) for mode in result["training"]["steps"]},
                "train_seconds_per_sample": {mode: row["flops_per_sample"] / rate for mode, row in result["training"]["steps"].items()},
            }
        )
    return out


def format_plan(result: dict[str, Any]) -> str:
    """The plan as tables (GiB = 2^30 bytes, TFLOP = 10^12)."""
    config = PlanConfig.model_validate(result["config"])
    lines = [
        f"restoray plan: preset {config.preset}, {config.dtype}, restore at {config.size} px ({config.steps} steps), "
        f"training at {config.train_size} px with ZeRO-2 over {config.gpus} GPUs; fake tensors (no weights), "
        f"measured in {result['seconds']:.0f} s",
        "",
        f"{'network':<16}{'parameters':>13}{'GiB':>8}{'trained':>12}",
    ]
    for name, stats in result["parameters"].items():
        lines.append(f"{name:<16}{stats['count'] / 1e9:>11.3f} B{stats['bytes'] / GiB:>8.2f}{stats['trainable'] / 1e9:>10.3f} B")
    lines += [
        "",
        "peak GiB of each phase with restore.offload = none / model / all (the networks on the device + its activations)",
        f"{'phase':<30}{'TFLOP':>8}{'activ.':>8}{'none':>8}{'model':>8}{'all':>8}  note",
    ]
    for row in result["phases"]:
        peak = row["peak_bytes"]
        lines.append(
            f"{row['phase']:<30}{row['flops'] / 1e12:>8.2f}{row['activation_bytes'] / GiB:>8.2f}"
            f"{peak['none'] / GiB:>8.2f}{peak['model'] / GiB:>8.2f}{peak['all'] / GiB:>8.2f}  {row['note']}"
        )
    lines += ["", "peak GiB per workload (none / model / all):"]
    for workload, peak in result["peaks"].items():
        lines.append(f"  {workload:<22}{peak['none'] / GiB:>7.2f} /{peak['model'] / GiB:>6.2f} /{peak['all'] / GiB:>6.2f}")
    training = result["training"]
    lines += [
        "",
        f"one training step per GPU ({training['trainable_parameters'] / 1e9:.3f} B trained parameters): networks "
        f"{training['resident_bytes'] / GiB:.2f} GiB, reduce buckets {training['bucket_bytes'] / GiB:.2f} GiB, fp32 masters + "
        f"moments + gradient partition / {config.gpus}: {training['optimizer_bytes'] / GiB:.2f} GiB",
    ]
    for mode, row in training["steps"].items():
        lines.append(
            f"  {mode:<14}{row['activation_bytes_per_sample'] / GiB:.2f} GiB activations per sample "
            f"(+{row['activation_bytes_base'] / GiB:.2f}), {row['flops_per_sample'] / 1e12:.2f} TFLOP per sample"
        )

    def offload(fits: list[str]) -> str:
        return fits[0] if fits else "no"

    native, tiled, refir = f"restore {config.size}", f"restore {2 * config.size} tiled", f"ReFIR {config.size}"
    lines += [
        "",
        f"{'GPU':<11}{'GiB':>5}  {'restore':<8}{'tiled':<7}{'ReFIR':<7}{'VLM':<5}"
        f"{'s/step':>7}{'s/image':>8}{'tiled':>8}{'paired':>8}{'caption':>8}{'batch':>8}{'ckpt':>8}{'s/sample':>9}",
    ]
    for gpu in result["gpus"]:
        seconds, fits = gpu["seconds_per_image"], gpu["fits"]
        lines.append(
            f"{gpu['gpu']:<11}{gpu['memory_gib']:>5.0f}  {offload(fits[native]):<8}{offload(fits[tiled]):<7}"
            f"{offload(fits[refir]):<7}{'yes' if fits['caption'] else 'no':<5}{gpu['seconds_per_step']:>7.3f}"
            f"{seconds['native']:>8.2f}{seconds['tiled']:>8.2f}"
            f"{seconds['refir_paired']:>8.2f}{seconds['caption']:>8.2f}{gpu['train_batch']['plain']:>8}"
            f"{gpu['train_batch']['checkpointing']:>8}{gpu['train_seconds_per_sample']['plain']:>9.3f}"
        )
    lines += [
        "",
        "restore/tiled/ReFIR: the least offload that fits (none, model, all) or no; VLM: the captioner in its own phase.",
        "s/step, s/image: lower bounds (FLOPs / dense bf16 rate) of one CFG step and of the restore without the caption;",
        "caption: the VLM's own (prefill FLOPs / rate + every generated token reading the language model once / bandwidth).",
        "batch/ckpt: the largest training batch per GPU without / with gradient checkpointing; s/sample: its lower bound.",
        "Not seen: cuDNN/cuBLAS workspaces, allocator fragmentation, the CUDA context (the table keeps "
        f"{gpu_table()[0]:g} GiB of every card for them).",
    ]
    return "\n".join(lines)
