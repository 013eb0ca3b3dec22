"""SUPIR's released checkpoints (SUPIR-v0Q / SUPIR-v0F) in restoray's names.

A released checkpoint is a flat name -> tensor mapping in sgm/CompVis LDM names holding three groups (see
tests/data/supir/README.md): the GLVControl trunk `model.control_model.*` (its own time/label embeddings, a copy
of SDXL's encoder and middle block, and `input_hint_block.0`, the zero conv that adds the LQ latent), the twelve
connectors `model.diffusion_model.project_modules.*` and the degradation-robust VAE encoder
`first_stage_model.denoise_encoder.*`. The SDXL UNet, VAE and text encoders come from the SDXL base, not from it.

- The trunk goes through diffusers' own LDM conversion (`convert_ldm_unet_checkpoint`, with the prefix
  `model.control_model.` read as `model.diffusion_model.`; that also maps the trunk's `time_embed` and
  `label_emb` to diffusers' `time_embedding` / `add_embedding`), then sits under the adaptor.
- The denoise encoder goes through `convert_ldm_vae_checkpoint` as if it were the VAE's encoder.
- Written here, because only SUPIR has it: `project_modules`. LightGLVUNet counts them down from the middle block:
  the last one modulates the middle block's output, then each decoder position (ldm output block) takes the next
  one for its skip (ZeroSFT), and a decoder block with an upsampler takes one more, a ZeroCrossAttn, after its last
  position. With SDXL: 11 = middle, 10, 9, 8 = up block 0's three positions, 7 = its ZeroCrossAttn, 6, 5, 4 = up
  block 1, 3 = its ZeroCrossAttn, 2, 1, 0 = up block 2 (no upsampler). Leaf names: ZeroSFT `mlp_shared.0` ->
  `shared.0`, `zero_mul` -> `gamma`, `zero_add` -> `beta`, `zero_conv` -> `skip_add`, `param_free_norm` -> `norm`;
  ZeroCrossAttn `attn.to_{q,k,v}` -> `to_{q,k,v}`, `attn.to_out.0` -> `to_out`, `norm1` -> `norm_x`, `norm2` -> `norm_c`.
- `model.control_model.mask_LQ` (in some copies; no released module creates it) is dropped by name.

`convert_supir_state` returns tensors named as `Restorer.trained_state()` names them ("model.adaptor.*",
"model.connectors.*", "model.cross_attentions.*", "model.mid_connector.*", "encoder.encoder.*") and fails, naming
keys, when anything is left over, missing or of another shape. Pure torch, no loading from disk here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

CONTROL, PROJECTS, DENOISE = "model.control_model.", "model.diffusion_model.project_modules.", "first_stage_model.denoise_encoder."
DROPPED_KEYS = ("model.control_model.mask_LQ",)
HINT = CONTROL + "input_hint_block.0."

ZERO_SFT_LEAVES = {"mlp_shared.0": "shared.0", "zero_mul": "gamma", "zero_add": "beta", "zero_conv": "skip_add", "param_free_norm": "norm"}
ZERO_CROSS_ATTN_LEAVES = {
    "attn.to_q": "to_q",
    "attn.to_k": "to_k",
    "attn.to_v": "to_v",
    "attn.to_out.0": "to_out",
    "norm1": "norm_x",
    "norm2": "norm_c",
}


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the adaptor layout: the message names the keys."""


def project_module_targets(model) -> list[tuple[str, dict[str, str]]]:
    """For each SUPIR project_modules index (0 first), our module path and its leaf-name map."""
    order: list[tuple[str, dict[str, str]]] = []  # in LightGLVUNet's order: from the middle block down
    if model.mid_connector is not None:
        order.append(("model.mid_connector", ZERO_SFT_LEAVES))
    for index, block in enumerate(model.unet.up_blocks):
        for position in range(len(block.resnets)):
            order.append((f"model.connectors.{index}.{position}", ZERO_SFT_LEAVES))
        if str(index) in model.cross_attentions:
            order.append((f"model.cross_attentions.{index}", ZERO_CROSS_ATTN_LEAVES))
    return list(reversed(order))


def _rename_project_module(rest: str, targets: list[tuple[str, dict[str, str]]]) -> str:
    index, _, leaf = rest.partition(".")
    if not index.isdigit() or int(index) >= len(targets):
        raise CheckpointMismatch(f"project_modules.{index}: the adaptor layout has {len(targets)} connectors")
    path, leaves = targets[int(index)]
    for theirs, ours in leaves.items():
        if leaf.startswith(theirs + "."):
            return f"{path}.{ours}{leaf[len(theirs) :]}"
    raise CheckpointMismatch(
        f"project_modules.{rest}: no such parameter in a {'ZeroSFT' if leaves is ZERO_SFT_LEAVES else 'ZeroCrossAttn'}"
    )


def convert_supir_state(
    checkpoint: Mapping[str, torch.Tensor], model, unet_config: Mapping, vae_config: Mapping, expected: Mapping[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """SUPIR-v0 tensors -> trained-state names. `model` is the AdaptedUNet whose layout receives them (it is only read
    for its structure: it may live on the meta device); `expected` maps each trained-state name the result must
    fill to its shape (the encoder's quant_conv, which SUPIR shares with the VAE, is not among them)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unknown = [key for key in checkpoint if not key.startswith((CONTROL, PROJECTS, DENOISE)) and key not in DROPPED_KEYS]
    if unknown:
        raise CheckpointMismatch(f"{len(unknown)} tensors are not SUPIR-v0's ({', '.join(unknown[:5])}); an SDXL checkpoint?")
    trunk = {
        "model.diffusion_model." + key[len(CONTROL) :]: value
        for key, value in checkpoint.items()
        if key.startswith(CONTROL) and not key.startswith(HINT) and key not in DROPPED_KEYS
    }
    converted: dict[str, torch.Tensor] = {}
    trunk_converted = convert_ldm_unet_checkpoint(trunk, dict(unet_config))
    converted.update({f"model.adaptor.{key}": value for key, value in trunk_converted.items()})
    for leaf in ("weight", "bias"):
        if HINT + leaf in checkpoint:
            converted[f"model.adaptor.lq_conv_in.{leaf}"] = checkpoint[HINT + leaf]

    targets = project_module_targets(model)
    for key, value in checkpoint.items():
        if key.startswith(PROJECTS):
            converted[_rename_project_module(key[len(PROJECTS) :], targets)] = value

    denoise = {"first_stage_model.encoder." + key[len(DENOISE) :]: value for key, value in checkpoint.items() if key.startswith(DENOISE)}
    if denoise:
        encoder = convert_ldm_vae_checkpoint(denoise, dict(vae_config))
        converted.update({f"encoder.{key}": value for key, value in encoder.items()})

    # Everything the checkpoint holds must have landed once: diffusers' converters skip names they do not know.
    consumed = len(trunk_converted) + sum(HINT + leaf in checkpoint for leaf in ("weight", "bias"))
    consumed += sum(key.startswith(PROJECTS) for key in checkpoint) + len(denoise)
    held = sum(key not in DROPPED_KEYS for key in checkpoint)
    if consumed != held:
        raise CheckpointMismatch(f"{held - consumed} of the checkpoint's {held} tensors have no place in the adaptor layout")
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    wrong = [
        f"{key} {tuple(converted[key].shape)} != {tuple(expected[key])}"
        for key in converted
        if key in expected and converted[key].shape != expected[key]
    ]
    if missing or extra or wrong:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} ({', '.join(missing[:4])})")
        if extra:
            problems.append(f"unplaced {len(extra)} ({', '.join(extra[:4])})")
        if wrong:
            problems.append(f"wrong shape {len(wrong)} ({'; '.join(wrong[:3])})")
        raise CheckpointMismatch("the SUPIR checkpoint does not fit the adaptor layout: " + ", ".join(problems))
    return converted


def expected_state(model, encoder) -> dict[str, torch.Size]:
    """The trained-state names and shapes a SUPIR checkpoint fills: the adaptor, connectors and robust encoder (not
    the encoder's quant_conv: SUPIR shares the VAE's, which comes from the SDXL base)."""
    shapes = {f"model.{k}": v.shape for k, v in model.state_dict().items() if not k.startswith("unet.")}
    shapes.update({f"encoder.{k}": v.shape for k, v in encoder.state_dict().items() if not k.startswith("quant_conv.")})
    return shapes
