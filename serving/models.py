"""Model versions on a Restorer replica: resolve a model id (models:/NAME/VERSION, s3://, a directory, a preset name)
to local weights, load it on the replica's one frozen SDXL base per preset, name the version it serves.

Only adaptors, connectors, robust encoders, experts and estimators differ between versions (SUPIR and SPIRE keep
SDXL frozen), so every version of one preset shares one set of base networks; the LRU of loaded versions is Serve's
(`@serve.multiplexed`), the bases are kept here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from restoration.errors import InputError
from restoration.models.base import SDXLNetworks, load_sdxl
from restoration.models.presets import list_presets, load_preset
from restoration.precision import resolve_dtype
from restoration.restorer import CONFIG_FILE, WEIGHTS_FILE, Restorer, weights_directory
from runtime.config import MlflowConfig, StorageConfig
from runtime.resolve import resolve


@dataclass
class LoadedModel:
    uri: str  # the model id as requested
    version: str  # the registry version, or a digest of the weights, or "untrained"
    restorer: Restorer

    def describe(self) -> dict:
        return {"uri": self.uri, "version": self.version, **self.restorer.identity()}


def weights_version(uri: str, directory: Path | None) -> str:
    """models:/NAME/3 -> "3"; a weights directory -> the first 12 hex digits of its weights' SHA-256; a preset -> "untrained"."""
    if uri.startswith("models:/"):
        return uri.rstrip("/").rsplit("/", 1)[-1].split("@")[-1]
    if directory is None:
        return "untrained"
    digest = hashlib.sha256((directory / CONFIG_FILE).read_bytes())
    with open(directory / WEIGHTS_FILE, "rb") as weights:
        digest.update(hashlib.file_digest(weights, "sha256").digest())
    return digest.hexdigest()[:12]


class ModelStore:
    """Loads model versions for one replica; `bases` holds one frozen SDXL base per preset."""

    def __init__(self, storage: StorageConfig, mlflow: MlflowConfig, device: str = "cpu", dtype: str = "auto", offload: str = "none"):
        """`device`, `dtype`, `offload`: where and how every version runs (the serve config's `restore.dtype` and
        `restore.offload`; see `Restorer.to`); the bases are read straight into the dtype."""
        self.storage, self.mlflow = storage, mlflow
        self.device, self.dtype, self.offload = device, resolve_dtype(dtype, device), offload
        self.bases: dict[str, SDXLNetworks] = {}

    def base(self, preset: str) -> SDXLNetworks:
        if preset not in self.bases:
            self.bases[preset] = load_sdxl(load_preset(preset), self.dtype).frozen()
        return self.bases[preset]

    def load(self, uri: str) -> LoadedModel:
        """Raises InputError for a model id that names nothing loadable."""
        try:
            preset_names = {preset.name for preset in list_presets()}
            local = uri if uri in preset_names else resolve(uri, self.storage, self.mlflow)
            directory = weights_directory(local)
            preset = Restorer.preset_of(local)
            load_preset(preset)  # an unknown preset name is bad input, named as such
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise InputError(f"model {uri!r}: cannot be read ({err})") from err
        restorer = Restorer.from_pretrained(local, networks=self.base(preset), device=self.device, dtype=self.dtype, offload=self.offload)
        return LoadedModel(uri, weights_version(uri, directory), restorer)
