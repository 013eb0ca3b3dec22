"""Preset registry: which networks a run uses, as data (one TOML file per preset in `preset_files/`).

A preset names every network of a run: the SDXL UNet, VAE, both text encoders and their tokenizers, the
captioner (a VLM) and the open-clip scorer. Each network is either

- `source` (+ `subfolder`, `revision`): a Hugging Face id or a local directory in the diffusers/transformers
  layout, loaded with `from_pretrained`; or
- `config`: a small architecture config built with seeded random weights, offline, for tests and the demo.

Like open_clip's `model_configs/*.json`, presets are listed with `list_presets()` and extended with
`add_preset_file(path)`; `load_preset` also takes the path of a TOML file directly. A `source` starting with
"./" or "../" is relative to the preset file (so a directory holding a preset and its weights can be moved).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from restoration.config_model import StrictModel
from restoration.errors import PresetError

PRESET_DIR = Path(__file__).with_name("preset_files")


class NetworkSpec(StrictModel):
    """One network: pretrained weights by id/path, or a small config with seeded random weights."""

    source: str | None = Field(None, description="Hugging Face id or local directory of pretrained weights.")
    subfolder: str | None = Field(None, description="Folder inside `source` (e.g. 'unet' in an SDXL repo).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `source`.")
    config: dict[str, Any] | None = Field(None, description="Architecture config for random initialisation.")

    @model_validator(mode="after")
    def _one_origin(self) -> NetworkSpec:
        if (self.source is None) == (self.config is None):
            raise ValueError("give exactly one of 'source' (pretrained) or 'config' (random init)")
        return self

    @property
    def pretrained(self) -> bool:
        return self.source is not None


class TokenizerSpec(StrictModel):
    """A CLIP BPE tokenizer: from `source`, or built from the BPE vocabulary open_clip ships."""

    source: str | None = Field(None, description="Hugging Face id or local directory holding the tokenizer.")
    subfolder: str | None = Field(None, description="Folder inside `source` (e.g. 'tokenizer_2').")
    revision: str | None = Field(None, description="Hub revision of `source`.")
    vocabulary: str | None = Field(None, description="'open_clip_bpe': build from the BPE merges file that open_clip ships (offline).")
    pad_token: str | None = Field(None, description="Pad token override (SDXL's second tokenizer pads with '!').")
    max_length: int = Field(77, ge=8, description="Token context length.")

    @model_validator(mode="after")
    def _one_origin(self) -> TokenizerSpec:
        if (self.source is None) == (self.vocabulary is None):
            raise ValueError("give exactly one of 'source' or 'vocabulary'")
        if self.vocabulary not in (None, "open_clip_bpe"):
            raise ValueError(f"unknown vocabulary {self.vocabulary!r}; known: 'open_clip_bpe'")
        return self


class CaptionerSpec(NetworkSpec):
    """A vision-language model that writes captions (LLaVA-style, image-text-to-text)."""

    prompt: str = Field(
        "Describe this image and its style in a very detailed manner.",
        description="Instruction given to the VLM with each image (SUPIR's captioning instruction).",
    )
    max_new_tokens: int = Field(77, ge=1, description="Longest caption, in tokens.")


class ClipScorerSpec(StrictModel):
    """An open-clip model for embeddings, aesthetic and image-text scores."""

    architecture: str = Field(description="open-clip architecture name, e.g. 'ViT-L-14'.")
    pretrained: str | None = Field(None, description="open-clip pretrained tag or local weights path; unset = random init from `config`.")
    config: dict[str, Any] | None = Field(
        None, description="open-clip model config registered under `architecture` (for tiny random models)."
    )
    aesthetic_head: str | None = Field(
        None,
        description="Linear aesthetic predictor on normalised image embeddings: a safetensors file with 'weight' (1, D) "
        "and 'bias' (1,) (LAION's predictor), 'random' for a seeded random head (tiny presets), or unset for none.",
    )

    @model_validator(mode="after")
    def _one_origin(self) -> ClipScorerSpec:
        if (self.pretrained is None) == (self.config is None):
            raise ValueError("give exactly one of 'pretrained' (weights) or 'config' (random init)")
        return self


class Preset(StrictModel):
    name: str = Field(description="Name used in configs and on the command line.")
    description: str = Field(description="One line for `restoray list presets`.")
    seed: int = Field(0, description="Seed of every randomly initialised network.")
    scheduler: NetworkSpec = Field(
        description="The base's training noise schedule: a diffusers scheduler config (`source` + subfolder 'scheduler', "
        "or an inline `config`); only prediction_type 'epsilon' is supported."
    )
    unet: NetworkSpec = Field(description="SDXL UNet2DConditionModel (frozen).")
    vae: NetworkSpec = Field(description="AutoencoderKL.")
    text_encoder: NetworkSpec = Field(description="CLIP ViT-L text encoder (CLIPTextModel).")
    text_encoder_2: NetworkSpec = Field(description="OpenCLIP bigG text encoder (CLIPTextModelWithProjection).")
    tokenizer: TokenizerSpec = Field(description="Tokenizer of text_encoder.")
    tokenizer_2: TokenizerSpec = Field(description="Tokenizer of text_encoder_2.")
    captioner: CaptionerSpec = Field(description="VLM that captions training images.")
    clip_scorer: ClipScorerSpec = Field(description="open-clip model for embeddings and scores.")
    adaptor: dict[str, Any] | None = Field(
        None, description="Adaptor/connector config (restoration.models.adaptor.AdaptorConfig); unset = the paper's trimmed default."
    )

    def networks(self) -> dict[str, NetworkSpec | TokenizerSpec | ClipScorerSpec]:
        return {
            name: getattr(self, name) for name in Preset.model_fields if name not in ("name", "description", "seed", "adaptor", "scheduler")
        }


_registry: dict[str, Path] = {}


def _scan() -> None:
    for path in sorted(PRESET_DIR.glob("*.toml")):
        _registry.setdefault(path.stem, path)


def add_preset_file(path: str | Path) -> str:
    """Register a preset TOML file under its `name`; returns the name."""
    preset = _read(Path(path))
    _registry[preset.name] = Path(path)
    return preset.name


def list_presets() -> list[Preset]:
    _scan()
    return [_read(path) for _, path in sorted(_registry.items())]


def preset_file(name_or_path: str) -> Path:
    """The TOML file behind a registered preset name, or the path itself."""
    _scan()
    if name_or_path in _registry:
        return _registry[name_or_path]
    if name_or_path.endswith(".toml") and Path(name_or_path).is_file():
        return Path(name_or_path)
    raise PresetError(f"unknown preset {name_or_path!r}; known: {', '.join(sorted(_registry))} (or give the path of a preset .toml file)")


def load_preset(name_or_path: str) -> Preset:
    """A registered preset by name, or a preset TOML file by path."""
    _scan()
    if name_or_path in _registry:
        return _read(_registry[name_or_path])
    if name_or_path.endswith(".toml"):
        return _read(Path(name_or_path))
    raise PresetError(f"unknown preset {name_or_path!r}; known: {', '.join(sorted(_registry))} (or give the path of a preset .toml file)")


def _read(path: Path) -> Preset:
    if not path.is_file():
        raise PresetError(f"preset file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        for table in data.values():
            source = table.get("source") if isinstance(table, dict) else None
            if isinstance(source, str) and source.startswith(("./", "../")):
                table["source"] = str((path.parent / source).resolve())
        return Preset.model_validate(data)
    except tomllib.TOMLDecodeError as err:
        raise PresetError(f"preset file {path}: not valid TOML: {err}") from err
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise PresetError(f"preset file {path}: {problems}") from err
