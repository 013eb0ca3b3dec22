"""Model versions on a Restorer replica: load the catalog's models (serving/catalog.py) on the replica's one frozen
SDXL base per preset, and name the version each serves.

Only adaptors, connectors, robust encoders, experts and estimators differ between versions (SUPIR and SPIRE keep
SDXL frozen), so every version of one preset shares one set of base networks; the LRU of loaded versions is Serve's
(`@serve.multiplexed`), the bases are kept here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from restoration.errors import InputError
from restoration.models.base import SDXLNetworks, load_sdxl
from restoration.models.presets import load_preset
from restoration.precision import resolve_dtype
from restoration.restorer import CONFIG_FILE, WEIGHTS_FILE, Restorer, weights_directory
from runtime.config import MlflowConfig, StorageConfig
from runtime.resolve import resolve
from serving.catalog import ModelCatalog
from serving.config import AppConfig


@dataclass
class LoadedModel:
    name: str  # the public name it is served under
    version: str  # the registry version, or a digest of the weights, or "untrained"
    restorer: Restorer

    def describe(self) -> dict[str, Any]:
        """What clients see of a model: never its path or URI."""
        identity = self.restorer.identity()
        return {"name": self.name, "version": self.version, "preset": Path(identity["preset"]).name, "experts": identity["experts"]}


def weights_version(uri: str, directory: Path | None) -> str:
    """models:/NAME/3 -> "3"; a weights directory -> the first 12 hex digits of its weights' SHA-256; a preset -> "untrained"."""
    if uri.startswith("models:/"):
        return uri.rstrip("/").rsplit("/", 1)[-1]
    if directory is None:
        return "untrained"
    digest = hashlib.sha256((directory / CONFIG_FILE).read_bytes())
    with open(directory / WEIGHTS_FILE, "rb") as weights:
        digest.update(hashlib.file_digest(weights, "sha256").digest())
    return digest.hexdigest()[:12]


class ModelStore:
    """Loads the catalog's model versions for one replica; `bases` holds one frozen SDXL base per preset."""

    def __init__(self, config: AppConfig, device: str = "cpu"):
        """Every version runs on `device` in the serve config's `restore.dtype` and `restore.offload` (see
        `Restorer.to`); the bases are read straight into the dtype."""
        self.catalog = ModelCatalog(config)
        self.storage: StorageConfig = config.storage
        self.mlflow: MlflowConfig = config.mlflow
        self.device, self.dtype, self.offload = device, resolve_dtype(config.restore.dtype, device), config.restore.offload
        self.bases: dict[str, SDXLNetworks] = {}

    def base(self, preset: str) -> SDXLNetworks:
        if preset not in self.bases:
            self.bases[preset] = load_sdxl(load_preset(preset), self.dtype).frozen()
        return self.bases[preset]

    def load(self, model_id: str) -> LoadedModel:
        """Raises InputError for an id outside the catalog or one that names nothing loadable (neither names a path)."""
        name = self.catalog.name_of(model_id)
        if name is None or not self.catalog.allows(model_id):
            raise InputError("not a model this service serves")
        try:
            local = model_id if model_id in (preset.name for preset in _presets()) else resolve(model_id, self.storage, self.mlflow)
            directory = weights_directory(local)
            preset = Restorer.preset_of(local)
            load_preset(preset)
        except (OSError, json.JSONDecodeError, KeyError, InputError) as err:
            # The operator's log gets the reason; the client only the name (a path's existence is not its business).
            raise InputError(f"model {name!r} cannot be loaded ({type(err).__name__}); the service's log says why") from err
        restorer = Restorer.from_pretrained(local, networks=self.base(preset), device=self.device, dtype=self.dtype, offload=self.offload)
        return LoadedModel(name, weights_version(model_id, directory), restorer)


def _presets():
    from restoration.models.presets import list_presets

    return list_presets()
