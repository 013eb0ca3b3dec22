"""`restoray convert supir`: a released SUPIR-v0Q/F checkpoint + the SDXL base -> a directory `Restorer.from_pretrained`
loads, relocatable: the base is copied in, and the preset written next to the weights names it by a relative path.

Layout of the output directory:
    restorer.json       preset "preset.toml" (relative), adaptor config, provenance of the conversion
    model.safetensors   adaptor (GLVControl trunk), connectors (project_modules), robust encoder (denoise_encoder)
    preset.toml         the layout preset (supir-v0 by default) with its SDXL networks at ./sdxl
    sdxl/               unet, vae, text_encoder(_2), tokenizer(_2)[, scheduler] in the diffusers layout: a copy of the
                        --sdxl folder, or converted from an original single-file checkpoint (the tokenizers are then
                        CLIP's BPE built offline and the scheduler SDXL's training schedule, both in preset.toml)

The directory is written under a temporary name beside the output and renamed at the end: an interrupted
conversion leaves no half-written model behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import tomllib
from pathlib import Path

import torch

from restoration.errors import InputError

log = logging.getLogger(__name__)

SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
DROP_FROM_TABLE = ("source", "subfolder", "revision", "config", "vocabulary")


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor mapping from a .safetensors file or a torch .ckpt (never unpickling arbitrary objects)."""
    if not path.is_file():
        raise InputError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # an unsafe pickle, a truncated file, not a checkpoint at all
        raise InputError(f"{path}: not a loadable checkpoint with weights_only=True ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # sgm's load_state_dict unwraps this too
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: expected a flat name -> tensor mapping")
    return state


def _check_sdxl(sdxl: Path) -> None:
    if sdxl.is_file():
        return  # an original single-file checkpoint: checked when converted
    if not sdxl.is_dir():
        raise InputError(f"--sdxl {sdxl} does not exist")
    missing = [part for part in SDXL_PARTS if not (sdxl / part).is_dir()]
    if missing:
        raise InputError(f"--sdxl {sdxl}: not an SDXL diffusers folder (missing {', '.join(missing)})")


def converted_preset(layout: str, sdxl: Path, checkpoint: Path, staged: Path) -> dict:
    """The layout preset's TOML table with its SDXL networks at ./sdxl (relative to the preset file)."""
    from restoration.models.presets import preset_file
    from restoration.models.sdxl_checkpoint import base_config

    data = tomllib.loads(preset_file(layout).read_text(encoding="utf-8"))
    single_file = sdxl.is_file()
    parts = [part for part in (*SDXL_PARTS, "scheduler") if (staged / part).is_dir()]
    for part in parts:
        kept = {key: value for key, value in data.get(part, {}).items() if key not in DROP_FROM_TABLE}
        data[part] = {"source": "./sdxl", "subfolder": part, **kept}
    if single_file:  # CLIP's BPE built offline, SDXL's own schedule (unless the layout has an inline one)
        data["tokenizer"] = {"vocabulary": "open_clip_bpe"}
        data["tokenizer_2"] = {"vocabulary": "open_clip_bpe", "pad_token": "!"}
        if not data.get("scheduler", {}).get("config"):
            data["scheduler"] = {"config": {k: v for k, v in base_config("scheduler").items() if v is not None}}
    data["name"] = f"{data['name']}-converted"
    data["description"] = f"{checkpoint.name} on the SDXL base from {sdxl.name}, in the {layout} layout"
    return data


def convert_supir(checkpoint: str, sdxl: str, output: str, layout: str = "supir-v0") -> Path:
    import tomli_w

    from restoration.models.supir_checkpoint import CheckpointMismatch, convert_supir_state, expected_state
    from restoration.restorer import CONFIG_FILE, Restorer

    checkpoint_path, sdxl_path, output_path = Path(checkpoint), Path(sdxl), Path(output)
    _check_sdxl(sdxl_path)
    if output_path.exists() and any(output_path.iterdir()):
        raise InputError(f"--output {output_path}: exists and is not empty")
    state = load_checkpoint(checkpoint_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.", dir=output_path.parent))
    try:
        if sdxl_path.is_file():
            _convert_single_file(sdxl_path, layout, staging / "sdxl")
        else:
            for part in [*SDXL_PARTS, "scheduler"]:
                if (sdxl_path / part).is_dir():
                    log.info("copying SDXL %s", part)
                    shutil.copytree(sdxl_path / part, staging / "sdxl" / part)
        preset = converted_preset(layout, sdxl_path, checkpoint_path, staging / "sdxl")
        (staging / "preset.toml").write_text(tomli_w.dumps(preset), encoding="utf-8")
        log.info("building the %s layout on the SDXL base", layout)
        restorer = Restorer(str(staging / "preset.toml"))
        unet, vae = restorer.networks.unet, restorer.networks.vae
        try:
            converted = convert_supir_state(
                state, restorer.model, unet.config, vae.config, expected_state(restorer.model, restorer.encoder)
            )
        except CheckpointMismatch as err:
            raise InputError(f"{checkpoint_path}: {err}") from err
        restorer.load_trained_state(converted, str(checkpoint_path), partial_encoder=True)
        restorer.preset_name = "preset.toml"  # relative: from_pretrained resolves it against the directory
        restorer.save_pretrained(staging)
        config = json.loads((staging / CONFIG_FILE).read_text(encoding="utf-8"))
        config["converted_from"] = {"checkpoint": checkpoint_path.name, "bytes": checkpoint_path.stat().st_size, "tensors": len(state)}
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
        if output_path.exists():
            output_path.rmdir()
        staging.rename(output_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s (%d tensors converted)", output_path, len(converted))
    return output_path


def _convert_single_file(sdxl: Path, layout: str, target: Path) -> None:
    """An original single-file SDXL checkpoint -> diffusers folders under `target`. The architecture configs are the
    layout preset's inline ones when it has them (tiny presets), else SDXL base 1.0's written in the project."""
    from restoration.models.presets import load_preset
    from restoration.models.sdxl_checkpoint import convert_sdxl_single_file
    from restoration.models.supir_checkpoint import CheckpointMismatch

    preset = load_preset(layout)
    configs = {name: getattr(preset, name).config for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    log.info("converting the single-file SDXL checkpoint %s", sdxl.name)
    try:
        networks = convert_sdxl_single_file(load_checkpoint(sdxl), {k: v for k, v in configs.items() if v})
    except CheckpointMismatch as err:
        raise InputError(f"--sdxl {sdxl}: {err}") from err
    for name, network in networks.items():
        network.save_pretrained(target / name)


def run_convert_supir(checkpoint: str, sdxl: str, output: str, layout: str) -> int:
    path = convert_supir(checkpoint, sdxl, output, layout)
    print(f"converted {checkpoint} -> {path}  (restoray restore IMG --weights {path} ...)")
    return 0
