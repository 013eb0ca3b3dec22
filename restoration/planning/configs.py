"""Network configs without weights: what `restoray plan` and `bench/gpu.py` build real-size networks from.

A preset network given by `config` uses it; one given by `source` reads the config next to the weights when they are
local (a directory, or the Hugging Face cache: never a download), else a packaged copy of the config of the public
models the presets name (`models/base_configs/`: SDXL base 1.0's five, LLaVA-1.5 7B and 13B).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from restoration.errors import PresetError
from restoration.models.presets import NetworkSpec, Preset, TokenizerSpec

BASE_CONFIGS = Path(__file__).parents[1] / "models" / "base_configs"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
# (source, subfolder) -> packaged config file
PACKAGED: dict[tuple[str, str | None], str] = {
    (SDXL_BASE, "unet"): "sdxl_unet.json",
    (SDXL_BASE, "vae"): "sdxl_vae.json",
    (SDXL_BASE, "text_encoder"): "sdxl_text_encoder.json",
    (SDXL_BASE, "text_encoder_2"): "sdxl_text_encoder_2.json",
    (SDXL_BASE, "scheduler"): "sdxl_scheduler.json",
    ("llava-hf/llava-1.5-13b-hf", None): "llava_1.5_13b.json",
    ("llava-hf/llava-1.5-7b-hf", None): "llava_1.5_7b.json",
}


@cache
def packaged_config(file_name: str) -> dict[str, Any]:
    data = json.loads((BASE_CONFIGS / file_name).read_text(encoding="utf-8"))
    return {key: value for key, value in data.items() if not key.startswith("_")}


def _local_config(spec: NetworkSpec) -> dict[str, Any] | None:
    """The config.json beside local weights or in the Hugging Face cache; None when neither has it (no download)."""
    folder = Path(spec.source) / (spec.subfolder or "")
    for name in ("config.json", "scheduler_config.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text(encoding="utf-8"))
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of diffusers and transformers
        return None
    for name in ("config.json", "scheduler_config.json"):
        filename = f"{spec.subfolder}/{name}" if spec.subfolder else name
        cached = try_to_load_from_cache(spec.source, filename, revision=spec.revision)
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text(encoding="utf-8"))
    return None


def network_config(spec: NetworkSpec, what: str) -> dict[str, Any]:
    """The architecture config of one preset network, offline."""
    if spec.config is not None:
        return dict(spec.config)
    found = _local_config(spec)
    if found is not None:
        return {key: value for key, value in found.items() if not key.startswith("_")}
    packaged = PACKAGED.get((spec.source, spec.subfolder))
    if packaged is None:
        known = ", ".join(f"{source}{'/' + sub if sub else ''}" for source, sub in PACKAGED)
        raise PresetError(
            f"{what}: no config for {spec.source!r}{f' (subfolder {spec.subfolder!r})' if spec.subfolder else ''} offline: "
            f"give a local directory or put the model in the Hugging Face cache (packaged configs: {known})"
        )
    return packaged_config(packaged)


def random_weight_preset(preset: Preset) -> Preset:
    """The same preset with the SDXL networks and the noise schedule given by `config` (random weights at full size) and
    tokenizers built from open_clip's BPE vocabulary (CLIP's, which SDXL's tokenizers use): for benchmarks on a
    machine without the weights. The captioner and CLIP scorer are left as they are (not built by a Restorer)."""
    data = preset.model_dump(exclude_none=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        data[name] = NetworkSpec(config=network_config(getattr(preset, name), f"{preset.name}.{name}")).model_dump(exclude_none=True)
    data["tokenizer"] = TokenizerSpec(vocabulary="open_clip_bpe").model_dump(exclude_none=True)
    data["tokenizer_2"] = TokenizerSpec(vocabulary="open_clip_bpe", pad_token="!").model_dump(exclude_none=True)
    data["name"] = f"{preset.name}-random"
    data["description"] = f"{preset.name}'s networks at full size with random weights (benchmarks)"
    return Preset.model_validate(data)


def write_preset(preset: Preset, path: str | Path) -> Path:
    """A preset as a TOML file (`Restorer` takes a preset file's path)."""
    import tomli_w

    def without_none(value):  # TOML has no null: a config's None is its class's default anyway
        if isinstance(value, dict):
            return {key: without_none(item) for key, item in value.items() if item is not None}
        return value

    path = Path(path)
    path.write_text(tomli_w.dumps(without_none(preset.model_dump(exclude_none=True))), encoding="utf-8")
    return path
