"""The SUPIR/SPIRE adaptor and the frozen SDXL UNet it steers.

`RestorationAdaptor` is a trimmed copy of the UNet's encoder and middle block, initialised from the UNet's
weights (transformer depth per level configurable; by default half of the UNet's, as the SUPIR paper trims; its
released SUPIR_v0 keeps the full depth). The LQ latent enters through a zero-initialised conv added to the output
of the first input block (conv_in), so at initialisation the adaptor sees exactly what the UNet's encoder sees.
Its cross-attention and added text embedding take the *restoration* prompt (SPIRE); the frozen UNet keeps the
semantic prompt.

`AdaptedUNet` runs the frozen UNet with the adaptor's features joined to the decoder. diffusers' UNet only
accepts additive residuals, so the decoder's forward is written out here (this module, not hooks): each skip
concatenation `cat(h, skip)` is replaced by a connector (ZeroSFT, or SPIRE's modulation fusion) fed with the
adaptor feature at that skip, and a ZeroCrossAttn runs before each up block's upsampler. Everything else (time
and added embeddings, encoder, middle block, resnets, attentions, output head) is the UNet's own modules.

Shapes: x (B, 4, H, W) latents; prompt_embeds (B, T, D); skips and controls (B, C_i, H_i, W_i).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from restoration.config_model import StrictModel
from restoration.models.connectors import ModulationFusion, ZeroCrossAttn, ZeroSFT, zero_module


class AdaptorConfig(StrictModel):
    transformer_depth: list[int] | Literal["half", "full"] = Field(
        "half",
        description="Transformer blocks kept per encoder level and in the middle block: a list, 'half' of the UNet's "
        "(rounded up; the SUPIR paper's trim) or 'full' (SUPIR_v0).",
    )
    connector: Literal["zero_sft", "modulation"] = Field("zero_sft", description="SUPIR's ZeroSFT or SPIRE's modulation fusion.")
    connector_hidden: int = Field(128, ge=1, description="ZeroSFT hidden width (SUPIR: 128).")
    cross_attention_blocks: list[int] | None = Field(
        None, description="Indices of decoder blocks that get a ZeroCrossAttn before their upsampler; unset = all with one."
    )
    cross_attention_heads: int = Field(8, ge=1, description="Heads of each ZeroCrossAttn (reduced to divide the width).")
    cross_attention_head_dim: int | None = Field(
        None, ge=1, description="If set, heads = width // head_dim instead (SUPIR_v0: 64, as its CrossAttention)."
    )
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups in the connectors (reduced to divide the width).")
    norm_affine: bool = Field(False, description="Affine GroupNorm inside ZeroSFT (SUPIR_v0's `normalization` is affine).")
    mid_connector: bool = Field(True, description="A ZeroSFT on the middle block's output (no skip), as SUPIR_v0 has.")
    own_embeddings: bool = Field(
        False,
        description="The adaptor has its own time and added (label) embeddings, copied from the UNet's at initialisation "
        "(SUPIR_v0's GLVControl: time_embed, label_emb); unset: it reuses the frozen UNet's.",
    )
    condition: Literal["restoration", "semantic"] = Field(
        "restoration",
        description="The adaptor's text: 'restoration' (SPIRE: the restoration prompt on every pass) or 'semantic' (SUPIR: "
        "the UNet's own prompt on each CFG pass, the negative prompt on the unconditional one).",
    )


def _transformers(block: nn.Module) -> list[nn.Module]:
    return [attention for attention in getattr(block, "attentions", None) or [] if hasattr(attention, "transformer_blocks")]


def _trim(block: nn.Module, depth: int) -> None:
    for transformer in _transformers(block):
        transformer.transformer_blocks = nn.ModuleList(list(transformer.transformer_blocks)[:depth])


def run_encoder(
    blocks: nn.ModuleList, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The UNet encoder's forward: the last hidden state and every skip (conv_in output first)."""
    skips = [hidden]
    for block in blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, residuals = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
        else:
            hidden, residuals = block(hidden_states=hidden, temb=emb)
        skips.extend(residuals)
    return hidden, skips


class RestorationAdaptor(nn.Module):
    def __init__(self, unet: nn.Module, config: AdaptorConfig):
        super().__init__()
        levels = [*unet.down_blocks, unet.mid_block]
        full_depth = [max((len(t.transformer_blocks) for t in _transformers(block)), default=0) for block in levels]
        if config.transformer_depth == "half":
            depth = [math.ceil(d / 2) for d in full_depth]
        elif config.transformer_depth == "full":
            depth = full_depth
        else:
            depth = list(config.transformer_depth)
        if len(depth) != len(levels):
            raise ValueError(f"transformer_depth needs {len(levels)} entries (encoder levels + middle), got {len(depth)}")
        if config.own_embeddings:
            self.time_embedding = copy.deepcopy(unet.time_embedding)
            self.add_embedding = copy.deepcopy(unet.add_embedding)
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.lq_conv_in = zero_module(nn.Conv2d(unet.config.in_channels, unet.conv_in.out_channels, 3, padding=1))
        self.down_blocks = copy.deepcopy(unet.down_blocks)
        self.mid_block = copy.deepcopy(unet.mid_block)
        for block, kept in zip([*self.down_blocks, self.mid_block], depth, strict=True):
            _trim(block, kept)
        self.transformer_depth = depth

    def forward(
        self, sample: torch.Tensor, emb: torch.Tensor, lq_latent: torch.Tensor, restoration_embeds: torch.Tensor
    ) -> list[torch.Tensor]:
        """Control features at every skip of the UNet (conv_in, each down-block output), then the middle block's."""
        hidden, features = run_encoder(self.down_blocks, self.conv_in(sample) + self.lq_conv_in(lq_latent), emb, restoration_embeds)
        features.append(self.mid_block(hidden, emb, encoder_hidden_states=restoration_embeds))
        return features


def enable_gradient_checkpointing(module: nn.Module, enabled: bool = True) -> int:
    """Turn diffusers' per-block activation checkpointing on (or off) in every block of `module` (adaptor copies
    included, which are plain nn.Modules and so miss `ModelMixin.enable_gradient_checkpointing`). Returns the block
    count. Used by training and by `restoray plan`."""
    blocks = 0
    for child in module.modules():
        if hasattr(child, "gradient_checkpointing"):
            child.gradient_checkpointing = enabled
            child._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
            blocks += 1
    return blocks


class AdaptedUNet(nn.Module):
    """The frozen UNet + trainable adaptor + connectors. Only `adaptor` and `connectors` hold trainable weights."""

    def __init__(self, unet: nn.Module, config: AdaptorConfig | None = None):
        super().__init__()
        config = config or AdaptorConfig()
        self.config = config
        self.unet = unet.eval().requires_grad_(False)
        self.adaptor = RestorationAdaptor(unet, config)
        skip_channels = [unet.conv_in.out_channels]
        for block in unet.down_blocks:
            skip_channels.extend(resnet.out_channels for resnet in block.resnets)
            if block.downsamplers is not None:
                skip_channels.append(block.downsamplers[0].out_channels)
        connectors, attentions = nn.ModuleList(), nn.ModuleDict()
        stack = list(skip_channels)
        decoder_channels = unet.mid_block.resnets[-1].out_channels
        for index, block in enumerate(unet.up_blocks):
            block_connectors = nn.ModuleList()
            for resnet in block.resnets:
                skip = stack.pop()
                # The adaptor copies the encoder, so its feature at a skip has the skip's width.
                if config.connector == "zero_sft":
                    block_connectors.append(
                        ZeroSFT(skip, decoder_channels, skip, config.connector_hidden, config.norm_groups, config.norm_affine)
                    )
                else:
                    block_connectors.append(ModulationFusion(skip, skip))
                decoder_channels = resnet.out_channels
            connectors.append(block_connectors)
            wanted = config.cross_attention_blocks is None or index in config.cross_attention_blocks
            if block.upsamplers is not None and wanted:
                if config.cross_attention_head_dim:
                    heads = max(1, decoder_channels // config.cross_attention_head_dim)
                else:
                    heads = math.gcd(config.cross_attention_heads, decoder_channels)
                attentions[str(index)] = ZeroCrossAttn(decoder_channels, skip, heads=heads, norm_groups=config.norm_groups)
        self.connectors = connectors
        self.cross_attentions = attentions
        # Sees each decoder position's joined features (connector output, or the plain concatenation) before its
        # resnet, named after the attention module at that position: ReFIR computes its spatial gate there.
        self.block_observer: Callable[[str, torch.Tensor], None] | None = None
        mid_channels = unet.mid_block.resnets[-1].out_channels
        self.mid_connector = None
        if config.mid_connector:
            if config.connector == "zero_sft":
                self.mid_connector = ZeroSFT(mid_channels, 0, mid_channels, config.connector_hidden, config.norm_groups, config.norm_affine)
            else:
                self.mid_connector = ModulationFusion(mid_channels, mid_channels)

    def _own_embedding(self, sample: torch.Tensor, timestep: torch.Tensor, added: dict[str, torch.Tensor]) -> torch.Tensor:
        """GLVControl's `time_embed(t) + label_emb(y)`, y = [pooled text, sinusoidal size/crop ids] (SDXL's vector)."""
        unet = self.unet
        time_embedding = self.adaptor.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        text_embeds = added["text_embeds"]
        size_embeds = unet.add_time_proj(added["time_ids"].flatten()).reshape(text_embeds.shape[0], -1)
        return time_embedding + self.adaptor.add_embedding(torch.cat([text_embeds, size_embeds], dim=-1).to(time_embedding.dtype))

    def trainable_parameters(self) -> list[nn.Parameter]:
        modules = [self.adaptor, self.connectors, self.cross_attentions] + ([self.mid_connector] if self.mid_connector else [])
        return [p for module in modules for p in module.parameters()]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        added_cond: dict[str, torch.Tensor],
        lq_latent: torch.Tensor | None = None,
        restoration_embeds: torch.Tensor | None = None,
        restoration_added_cond: dict[str, torch.Tensor] | None = None,
        control_scale: float = 1.0,
    ) -> torch.Tensor:
        """eps prediction. The UNet gets the semantic prompt; the adaptor the restoration prompt (SPIRE)."""
        unet = self.unet
        timestep = timestep.expand(sample.shape[0]) if timestep.ndim else timestep.repeat(sample.shape[0])
        time_embedding = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        emb = time_embedding + unet.get_aug_embed(emb=time_embedding, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added_cond)
        controls: list[torch.Tensor] | None = None
        if control_scale != 0:
            if lq_latent is None or restoration_embeds is None:
                raise ValueError("a control scale above 0 needs lq_latent and restoration_embeds")
            restoration_added = restoration_added_cond or added_cond
            if self.config.own_embeddings:
                adaptor_emb = self._own_embedding(sample, timestep, restoration_added)
            else:
                adaptor_emb = time_embedding + unet.get_aug_embed(
                    emb=time_embedding, encoder_hidden_states=restoration_embeds, added_cond_kwargs=restoration_added
                )
            controls = self.adaptor(sample, adaptor_emb, lq_latent, restoration_embeds)

        hidden, skips = run_encoder(unet.down_blocks, unet.conv_in(sample), emb, prompt_embeds)
        hidden = unet.mid_block(hidden, emb, encoder_hidden_states=prompt_embeds)
        if controls is not None and self.mid_connector is not None:
            # No skip here: the connector modulates the middle block's output itself (an empty decoder part).
            hidden = self.mid_connector(hidden[:, :0], hidden, controls[-1], control_scale)
        control_stack = list(controls[:-1]) if controls is not None else None

        for index, block in enumerate(unet.up_blocks):
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            control = None
            for position, (resnet, attention) in enumerate(zip(block.resnets, attentions, strict=True)):
                skip = skips.pop()
                control = control_stack.pop() if control_stack is not None else None
                if control is None:
                    hidden = torch.cat([hidden, skip], dim=1)
                else:
                    hidden = self.connectors[index][position](hidden, skip, control, control_scale)
                if attention is not None and self.block_observer is not None:
                    self.block_observer(f"up_blocks.{index}.attentions.{position}", hidden)
                hidden = resnet(hidden, emb)
                if attention is not None:
                    hidden = attention(hidden, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            if block.upsamplers is not None:
                if control is not None and str(index) in self.cross_attentions:
                    hidden = self.cross_attentions[str(index)](hidden, control, control_scale)
                upsample_size = skips[-1].shape[2:] if skips else None
                for upsampler in block.upsamplers:
                    hidden = upsampler(hidden, upsample_size)

        hidden = unet.conv_act(unet.conv_norm_out(hidden)) if unet.conv_norm_out is not None else hidden
        return unet.conv_out(hidden)
