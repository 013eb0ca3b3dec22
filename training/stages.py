"""The four training stages over the model library, as pure torch: no Ray, no DeepSpeed, no MLflow here.

A `Stage` splits one step in two:
- `prepare(batch, generator)`: everything frozen that is not differentiated through (VAE encoding of the HQ
  target, the robust encoder's z_LQ for the adaptor, the two text encoders, noise and timesteps), under no_grad
  and outside the training engine, so DeepSpeed never partitions or casts those networks;
- `module(**inputs) -> loss`: the part in the graph (trainable weights and the frozen networks the loss flows
  through, e.g. the frozen UNet under the adaptor), which the trainer hands to DeepSpeed.

Stages (DESIGN.md, issue #6):
- `adaptor`: SUPIR/SPIRE adaptor + connectors; eps-prediction MSE through the frozen UNet at uniform discrete
  timesteps of SDXL's schedule (what SUPIR's EDM loss with discrete sigmas and eps weighting amounts to). The
  semantic prompt (caption; the negative-quality prompt for `negative` and `degraded_negative` samples) drives the UNet, the
  restoration prompt the adaptor.
- `encoder`: the degradation-robust encoder, `||D(E_dr(x_LQ)) - D(E(x_HQ))||^2 + w ||E_dr(x_LQ) - E(x_HQ)||^2`
  with the VAE decoder frozen.
- `experts`: one ABAIR LoRA expert on the adaptor (everything else frozen), the same diffusion loss on `single`
  samples of its type.
- `estimator`: cross-entropy of the degradation estimator against the per-type pixel fractions of the masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from restoration.degradations.registry import REGISTRY
from restoration.degradations.sample import NEGATIVE_KINDS
from restoration.errors import InputError
from restoration.models.adaptor import AdaptedUNet, enable_gradient_checkpointing
from restoration.models.base import encode_prompt, size_crop_time_ids
from restoration.models.encoder import RobustEncoder
from restoration.models.estimator import DegradationEstimator
from restoration.models.experts import set_expert_weights, train_only
from restoration.precision import module_dtype
from restoration.prompts import BLIND_PROMPT, NEGATIVE_QUALITY_PROMPT
from restoration.restorer import Restorer, new_estimator
from training.config import TrainConfig


@dataclass
class Batch:
    """One micro-batch as the trainer hands it over: images in [-1, 1], (B, 3, H, W); masks (B, H, W) of registry ids."""

    hq: torch.Tensor
    lq: torch.Tensor
    masks: torch.Tensor
    captions: list[str]
    restoration_prompts: list[str]
    kinds: list[str]


class DiffusionLoss(nn.Module):
    """eps-prediction MSE of the adapted UNet at the given timesteps and noise."""

    def __init__(self, model: AdaptedUNet, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def forward(self, latents, lq_latents, noise, timesteps, prompt_embeds, pooled, restoration_embeds, restoration_pooled, time_ids):
        if self.model.config.condition == "semantic":  # SUPIR: the adaptor reads the UNet's prompt
            restoration_embeds, restoration_pooled = prompt_embeds, pooled
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1).to(latents.dtype)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        eps = self.model(
            noisy,
            timesteps,
            prompt_embeds,
            {"text_embeds": pooled, "time_ids": time_ids},
            lq_latents,
            restoration_embeds,
            {"text_embeds": restoration_pooled, "time_ids": time_ids},
        )
        return F.mse_loss(eps.float(), noise.float())


class EncoderLoss(nn.Module):
    """Robust encoder through the frozen VAE decoder: pixel term + weighted latent term."""

    def __init__(self, encoder: RobustEncoder, vae: nn.Module, latent_weight: float):
        super().__init__()
        self.encoder = encoder
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.latent_weight = latent_weight

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.encoder.scaling_factor
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def forward(self, lq, target_latents, target_images):
        latents = self.encoder(lq)
        pixel = F.mse_loss(self.decode(latents).float(), target_images.float())
        return pixel + self.latent_weight * F.mse_loss(latents.float(), target_latents.float())


class EstimatorLoss(nn.Module):
    def __init__(self, estimator: DegradationEstimator):
        super().__init__()
        self.estimator = estimator

    def forward(self, lq, masks):
        return self.estimator.loss(lq, masks)


class Stage:
    """What one training stage trains and how a batch becomes the engine module's inputs."""

    def __init__(self, restorer: Restorer, config: TrainConfig):
        self.restorer = restorer
        self.config = config
        self.name = config.stage
        restorer.networks.unet.requires_grad_(False)
        restorer.networks.vae.requires_grad_(False)
        if config.stage in ("adaptor", "experts"):
            self.module: nn.Module = DiffusionLoss(restorer.model, restorer.alphas_cumprod)
            restorer.encoder.requires_grad_(False)
            if config.stage == "adaptor":
                restorer.model.requires_grad_(False)
                self.parameters = restorer.model.trainable_parameters()
                for parameter in self.parameters:
                    parameter.requires_grad_(True)
            else:
                self.parameters = train_only(restorer.model, config.expert)
                set_expert_weights(restorer.model.adaptor, {config.expert: 1.0})
        elif config.stage == "encoder":
            self.module = EncoderLoss(restorer.encoder, restorer.networks.vae, config.encoder_latent_weight)
            self.parameters = list(restorer.encoder.parameters())
            for parameter in self.parameters:
                parameter.requires_grad_(True)
        else:
            self.module = EstimatorLoss(restorer.estimator)
            self.parameters = list(restorer.estimator.parameters())
            for parameter in self.parameters:
                parameter.requires_grad_(True)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.module)
        self.module.train()

    def hold_frozen_in(self, dtype: torch.dtype) -> list[str]:
        """Hold the networks this stage does not train in the training precision (bf16/fp16: half of fp32's memory).
        The trained ones stay fp32 here: DeepSpeed keeps their fp32 masters and casts the engine module itself. The
        estimator stays fp32 (tiny; its softmax picks experts). Returns the names of the networks cast."""
        if dtype == torch.float32:
            return []
        from restoration.precision import place

        trained = {id(parameter) for parameter in self.parameters}
        networks = self.restorer.networks
        candidates = {
            "unet": networks.unet,
            "vae": networks.vae,
            "text_encoder": networks.text_encoder,
            "text_encoder_2": networks.text_encoder_2,
            "encoder": self.restorer.encoder,
        }
        cast = [name for name, module in candidates.items() if not any(id(p) in trained for p in module.parameters())]
        for name in cast:
            place(candidates[name], dtype=dtype)
        return cast

    @torch.no_grad()
    def prepare(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        device = batch.hq.device
        if self.name == "estimator":
            return {"lq": batch.lq, "masks": batch.masks}
        vae = self.restorer.networks.vae
        vae_dtype = module_dtype(vae)  # the training precision when `hold_frozen_in` cast it
        target_latents = vae.encode(batch.hq.to(vae_dtype)).latent_dist.mean * vae.config.scaling_factor
        if self.name == "encoder":
            return {
                "lq": batch.lq,
                "target_latents": target_latents,
                "target_images": vae.decode(target_latents / vae.config.scaling_factor).sample,
            }
        size = len(batch.captions)
        drop_caption = torch.rand(size, generator=generator) < self.config.caption_dropout
        drop_restoration = torch.rand(size, generator=generator) < self.config.restoration_prompt_dropout
        captions = [
            NEGATIVE_QUALITY_PROMPT if kind in NEGATIVE_KINDS else ("" if dropped else caption)
            for caption, kind, dropped in zip(batch.captions, batch.kinds, drop_caption.tolist(), strict=True)
        ]
        restoration_prompts = [
            BLIND_PROMPT if dropped or not prompt else prompt
            for prompt, dropped in zip(batch.restoration_prompts, drop_restoration.tolist(), strict=True)
        ]
        prompt_embeds, pooled = encode_prompt(self.restorer.networks, captions)
        restoration_embeds, restoration_pooled = encode_prompt(self.restorer.networks, restoration_prompts)
        height, width = batch.hq.shape[2:]
        noise = torch.randn(target_latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, len(self.restorer.alphas_cumprod), (size,), generator=generator).to(device)
        return {
            "latents": target_latents,
            "lq_latents": self.restorer.encoder(batch.lq.to(module_dtype(self.restorer.encoder))),
            "noise": noise,
            "timesteps": timesteps,
            "prompt_embeds": prompt_embeds.to(device),
            "pooled": pooled.to(device),
            "restoration_embeds": restoration_embeds.to(device),
            "restoration_pooled": restoration_pooled.to(device),
            "time_ids": size_crop_time_ids((height, width), (0, 0), (height, width), batch=size).to(device),
        }


def require_trained_adaptor(init: str) -> None:
    """Experts train on a trained adaptor: with zero-initialised connectors no gradient reaches the adaptor, so a
    LoRA expert could not learn. Checked on the driver from the weights file (no model is built)."""
    from safetensors import safe_open

    from restoration.restorer import WEIGHTS_FILE, weights_directory

    directory = weights_directory(init)
    trained = False
    if directory is not None:
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
            names = [k for k in weights.keys() if "connector" in k and (".gamma.weight" in k or ".beta.weight" in k)]
            trained = any(weights.get_tensor(name).any() for name in names)
    if not trained:
        raise InputError(
            f"stage 'experts' trains LoRA experts on a trained adaptor, but {init!r} has untrained (zero) connectors: "
            "set train.init_from to a trained adaptor (e.g. models:/restoray-adaptor/1)"
        )


def prepare_restorer(restorer: Restorer, config: TrainConfig) -> Restorer:
    """Add what the stage trains if the weights lack it: the expert (experts) or an estimator over the types."""
    if config.stage == "experts":
        restorer.add_experts([config.expert], rank=config.expert_rank)
    if config.stage == "estimator":
        names = config.estimator_types or [degradation.name for degradation in REGISTRY.all()]
        type_ids = [REGISTRY.get(name).id for name in names]
        if restorer.estimator is None or restorer.estimator.type_ids != type_ids:
            # A new set of types means a new output layer: ABAIR retrains the (light) estimator when a type is added.
            restorer.set_estimator(new_estimator(restorer, type_ids))
    return restorer
