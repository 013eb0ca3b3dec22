"""Build or load the networks a preset names: SDXL (UNet, VAE, two text encoders, tokenizers), captioner, CLIP scorer.

Pretrained networks load with `from_pretrained` from a Hugging Face id or a local directory (this module never
sees `s3://` or `models:/`; `restoray` resolves those to local paths first). Networks given by `config` are
built with seeded random weights: each network's seed is the preset seed plus a stable hash of its name, so a
network's weights do not depend on which others were built before it.

Shapes: B batch, T tokens (77), D text width, H/W latent height/width.
"""

from __future__ import annotations

import gzip
import inspect
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from restoration.errors import PresetError
from restoration.models.presets import CaptionerSpec, ClipScorerSpec, NetworkSpec, Preset, TokenizerSpec
from restoration.seeding import torch_seeded

# SDXL's second tokenizer pads with "!" and CLIP reserves the last two ids for these.
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
IMAGE_TOKEN = "<image>"


@contextmanager
def _without_log_records(logger: logging.Logger, prefix: str) -> Iterator[None]:
    """Drop `logger`'s records starting with `prefix` meanwhile (a library's warning about what we do on purpose)."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _build_random(factory, seed: int, name: str):
    with torch_seeded(seed, name):
        return factory()


def _pretrained_kwargs(spec: NetworkSpec | TokenizerSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if spec.subfolder:
        kwargs["subfolder"] = spec.subfolder
    if spec.revision:
        kwargs["revision"] = spec.revision
    return kwargs


def _in_dtype(model, dtype: torch.dtype | None):
    """A randomly initialised network in `dtype`: built in fp32 (the seeded draws do not depend on the dtype), then cast."""
    from restoration.precision import place

    return model if dtype is None else place(model, dtype=dtype)


def load_unet(spec: NetworkSpec, seed: int = 0, dtype: torch.dtype | None = None):
    from diffusers import UNet2DConditionModel

    if spec.pretrained:  # torch_dtype: the weights are read straight into the dtype, never held in fp32 first
        return UNet2DConditionModel.from_pretrained(spec.source, torch_dtype=dtype, **_pretrained_kwargs(spec))
    return _in_dtype(_build_random(lambda: UNet2DConditionModel(**spec.config), seed, "unet"), dtype)


def _network_config(spec: NetworkSpec, model_class) -> dict:
    if spec.config is not None:
        return spec.config
    return model_class.load_config(spec.source, **_pretrained_kwargs(spec))


def native_size(preset: Preset) -> int:
    """The short side the preset's base was trained at (8 x the UNet's sample size: 1024 for SDXL), from the
    networks' configs alone (no weights loaded); `Restorer.native_size` of the same preset."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae_factor = 2 ** (len(_network_config(preset.vae, AutoencoderKL)["block_out_channels"]) - 1)
    return vae_factor * int(_network_config(preset.unet, UNet2DConditionModel)["sample_size"])


def load_vae(spec: NetworkSpec, seed: int = 0, dtype: torch.dtype | None = None):
    from diffusers import AutoencoderKL

    if spec.pretrained:
        return AutoencoderKL.from_pretrained(spec.source, torch_dtype=dtype, **_pretrained_kwargs(spec))
    return _in_dtype(_build_random(lambda: AutoencoderKL(**spec.config), seed, "vae"), dtype)


def load_text_encoder(
    spec: NetworkSpec, seed: int = 0, with_projection: bool = False, name: str = "text_encoder", dtype: torch.dtype | None = None
):
    """CLIP-L (`CLIPTextModel`) or, with `with_projection`, OpenCLIP-bigG (`CLIPTextModelWithProjection`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    if spec.pretrained:
        return cls.from_pretrained(spec.source, dtype=dtype, **_pretrained_kwargs(spec))
    return _in_dtype(_build_random(lambda: cls(CLIPTextConfig(**spec.config)), seed, name), dtype)


def open_clip_bpe_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary (49,408 tokens) and merges, rebuilt from the merges file open_clip ships, as open_clip does."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def load_tokenizer(spec: TokenizerSpec, extra_special_tokens: list[str] | None = None):
    from transformers import CLIPTokenizer

    kwargs: dict[str, Any] = {"model_max_length": spec.max_length}
    if spec.pad_token:
        kwargs["pad_token"] = spec.pad_token
    if spec.source is not None:
        tokenizer = CLIPTokenizer.from_pretrained(spec.source, **_pretrained_kwargs(spec), **kwargs)
    else:
        vocab, merges = open_clip_bpe_vocabulary()
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)
    if extra_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": extra_special_tokens})
    return tokenizer


SUPPORTED_PREDICTION_TYPES = ("epsilon",)


def scheduler_config(preset: Preset) -> dict[str, Any]:
    """The base's diffusers scheduler config (the preset's `[scheduler]`: a source's scheduler folder, or inline)."""
    from diffusers import DDPMScheduler

    spec = preset.scheduler
    if spec.pretrained:
        return dict(DDPMScheduler.load_config(spec.source, **_pretrained_kwargs(spec)))
    return dict(spec.config)


def load_noise_schedule(preset: Preset) -> torch.Tensor:
    """The base's training alphas_cumprod (float64, ascending in t) from the preset's `[scheduler]` table.

    The UNet's training schedule is data, not code: a base trained with another schedule samples and trains with its
    own. Only epsilon prediction is implemented (the loss and the sampler's x0); any other is refused by name."""
    from diffusers import DDPMScheduler

    config = scheduler_config(preset)
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in SUPPORTED_PREDICTION_TYPES:
        raise PresetError(
            f"preset {preset.name!r}: scheduler prediction_type {prediction!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_PREDICTION_TYPES)}); training and sampling predict epsilon"
        )
    known = set(inspect.signature(DDPMScheduler.__init__).parameters)
    # DDPMScheduler computes the betas from the same keys every diffusers scheduler uses; sampler-only keys
    # (timestep_spacing, steps_offset, interpolation_type, ...) do not change the training schedule.
    scheduler = DDPMScheduler.from_config({key: value for key, value in config.items() if key in known})
    return scheduler.alphas_cumprod.double()


@dataclass
class SDXLNetworks:
    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any

    def frozen(self) -> SDXLNetworks:
        """Eval mode, no gradients: the SDXL base is never trained (SUPIR, SPIRE)."""
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            module.eval().requires_grad_(False)
        return self


def load_sdxl(preset: Preset, dtype: torch.dtype | None = None) -> SDXLNetworks:
    """The preset's SDXL networks, in `dtype` (None: as stored/fp32); under fp16 the VAE stays fp32 (`precision`)."""
    from restoration.precision import place, vae_dtype

    vae = load_vae(preset.vae, preset.seed)
    return SDXLNetworks(
        unet=load_unet(preset.unet, preset.seed, dtype),
        vae=vae if dtype is None else place(vae, dtype=vae_dtype(vae, dtype)),
        text_encoder=load_text_encoder(preset.text_encoder, preset.seed, dtype=dtype),
        text_encoder_2=load_text_encoder(preset.text_encoder_2, preset.seed, with_projection=True, name="text_encoder_2", dtype=dtype),
        tokenizer=load_tokenizer(preset.tokenizer),
        tokenizer_2=load_tokenizer(preset.tokenizer_2),
    )


@torch.no_grad()
def encode_prompt(networks: SDXLNetworks, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning: penultimate hidden states of both encoders side by side, pooled output of the second.

    Returns (prompt_embeds_BTD, pooled_BD) with D = hidden(text_encoder) + hidden(text_encoder_2).
    """
    hidden_states = []
    pooled_BD = None
    for tokenizer, encoder in ((networks.tokenizer, networks.text_encoder), (networks.tokenizer_2, networks.text_encoder_2)):
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        device = next(encoder.parameters()).device
        output = encoder(tokens.input_ids.to(device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
        if hasattr(output, "text_embeds"):
            pooled_BD = output.text_embeds
    return torch.cat(hidden_states, dim=-1), pooled_BD


def size_crop_time_ids(
    original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int], batch: int
) -> torch.Tensor:
    """SDXL's micro-conditioning: (original size, crop top-left, target size) as six numbers per sample."""
    ids = torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)
    return ids.unsqueeze(0).repeat(batch, 1)


@dataclass
class Captioner:
    model: Any
    processor: Any
    prompt: str
    max_new_tokens: int


def load_captioner(
    spec: CaptionerSpec, tokenizer_spec: TokenizerSpec | None = None, seed: int = 0, dtype: torch.dtype | None = None
) -> Captioner:
    """A LLaVA-style VLM with its processor; random-init ones share CLIP's BPE tokenizer plus an image token."""
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if spec.pretrained:
        model = AutoModelForImageTextToText.from_pretrained(spec.source, dtype=dtype, **_pretrained_kwargs(spec))
        processor = AutoProcessor.from_pretrained(spec.source, **_pretrained_kwargs(spec))
        return Captioner(model, processor, spec.prompt, spec.max_new_tokens)
    config = LlavaConfig(**spec.config)
    model = _in_dtype(_build_random(lambda: LlavaForConditionalGeneration(config), seed, "captioner"), dtype)
    tokenizer = load_tokenizer(tokenizer_spec or TokenizerSpec(vocabulary="open_clip_bpe"), extra_special_tokens=[IMAGE_TOKEN])
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_index:
        raise ValueError(f"captioner config: image_token_index must be {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}")
    vision = config.vision_config
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vision.image_size}, crop_size={"height": vision.image_size, "width": vision.image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return Captioner(model, processor, spec.prompt, spec.max_new_tokens)


@dataclass
class ClipScorer:
    model: Any
    preprocess: Any
    tokenizer: Any

    @property
    def dim(self) -> int:
        """Width of the image embedding."""
        return int(self.model.visual.output_dim)

    @torch.no_grad()
    def embed_images(self, images: list) -> torch.Tensor:
        """L2-normalised image embeddings (N, dim), float32 on the CPU, of PIL images: the one embedding the build,
        the index and its queries share."""
        device = next(self.model.parameters()).device
        pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(device)
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu()


def load_clip_scorer(spec: ClipScorerSpec, seed: int = 0) -> ClipScorer:
    """An open-clip model by architecture + pretrained tag/path, or a registered small config with random weights."""
    import open_clip

    if spec.config is not None:
        with tempfile.TemporaryDirectory(prefix="restoray-clip-") as tmp:
            config_path = Path(tmp) / f"{spec.architecture}.json"
            config_path.write_text(json.dumps(spec.config), encoding="utf-8")
            open_clip.add_model_config(config_path)
        with _without_log_records(logging.getLogger(), "No pretrained weights loaded"):  # random weights are the point here
            model, _, preprocess = _build_random(
                lambda: open_clip.create_model_and_transforms(spec.architecture, pretrained=None), seed, "clip_scorer"
            )
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(spec.architecture, pretrained=spec.pretrained)
    return ClipScorer(model.eval(), preprocess, open_clip.get_tokenizer(spec.architecture))


def load_aesthetic_head(spec: ClipScorerSpec, seed: int = 0) -> torch.nn.Linear | None:
    """The preset's linear aesthetic predictor on normalised CLIP image embeddings, or None."""
    if spec.aesthetic_head is None:
        return None
    embed_dim = (spec.config or {}).get("embed_dim")
    if spec.aesthetic_head == "random":
        if embed_dim is None:
            raise ValueError("aesthetic_head 'random' needs the scorer's config (embed_dim)")
        return _build_random(lambda: torch.nn.Linear(embed_dim, 1), seed, "aesthetic_head").eval()
    from safetensors.torch import load_file

    weights = load_file(spec.aesthetic_head)
    head = torch.nn.Linear(weights["weight"].shape[1], 1)
    head.load_state_dict(weights)
    return head.eval()


def save_sdxl(networks: SDXLNetworks, directory: str | Path) -> Path:
    """Write the SDXL networks in the diffusers repository layout, so a `source` pointing here loads them."""
    directory = Path(directory)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        getattr(networks, name).save_pretrained(directory / name)
    return directory
