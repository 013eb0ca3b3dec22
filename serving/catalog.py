"""The models a service serves, by name only: `[serve.models]` (and `default`, which is serve.weights or the preset)
maps names an operator chose to URIs (models:/NAME/VERSION, models:/NAME@ALIAS, s3://, a weights directory).

The ingress turns a request's name into a `ModelRef` (`ModelCatalog.resolve`): an alias becomes the version it names
now, so replicas multiplex on a concrete `models:/NAME/VERSION` and one label never means two versions at once. A
name outside the catalog is a 404 listing the names, answered before any replica is asked, so it never evicts a
loaded model. Replicas load only what the catalog allows (`ModelCatalog.allows`; serving/models.py). What answers
and headers say about a model is its name, version and preset: never a path or a URI. Light to import (the ingress
holds no torch).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from runtime.resolve import registered_version
from serving.config import DEFAULT_MODEL, MODEL_NAME, AppConfig

ALIAS_REFRESH_S = 30.0  # how long the ingress trusts what an alias named (an alias moved is served within this)


class UnknownModel(Exception):
    """A request named a model the service does not serve (the ingress answers 404 with the names)."""

    def __init__(self, name: str, names: list[str]):
        # The name is echoed only when it looks like one: a path or URI a client sent is not repeated back.
        shown = repr(name) if MODEL_NAME.match(name) else "the requested model"
        super().__init__(f"model {shown}: not served here; the models are {', '.join(names)}")
        self.name, self.names = name, names


@dataclass(frozen=True)
class ModelRef:
    """A served model as the ingress resolved it: its public `name`, the concrete `model_id` replicas multiplex on
    (never shown to clients), and its registry `version` (None where the replica names it: a digest)."""

    name: str
    model_id: str
    version: str | None


def _alias_parts(uri: str) -> tuple[str, str] | None:
    if uri.startswith("models:/") and "@" in uri:
        name, _, alias = uri.removeprefix("models:/").strip("/").partition("@")
        return name, alias
    return None


class ModelCatalog:
    """Name -> URI, fixed by the operator; resolves names to concrete model ids (aliases through MLflow)."""

    def __init__(self, config: AppConfig):
        self.uris = {DEFAULT_MODEL: config.serve.weights or config.preset, **config.serve.models}
        self.mlflow = config.mlflow
        self._pinned: dict[str, tuple[float, str]] = {}  # alias URI -> (when, models:/NAME/VERSION)
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(self.uris)

    def resolve(self, name: str | None) -> ModelRef:
        """The model a request names (None or "": the default). Blocking where an alias is looked up in MLflow
        (at most every ALIAS_REFRESH_S per alias): the ingress calls it off its event loop."""
        name = name or DEFAULT_MODEL
        uri = self.uris.get(name)
        if uri is None:
            raise UnknownModel(name, self.names())
        if _alias_parts(uri) is not None:
            uri = self._pin(uri)
        version = uri.rstrip("/").rsplit("/", 1)[-1] if uri.startswith("models:/") else None
        return ModelRef(name, uri, version)

    def _pin(self, alias_uri: str) -> str:
        with self._lock:
            pinned = self._pinned.get(alias_uri)
            if pinned is not None and time.monotonic() - pinned[0] < ALIAS_REFRESH_S:
                return pinned[1]
        found = registered_version(alias_uri, self.mlflow)  # MlflowClient.get_model_version_by_alias
        concrete = f"models:/{found.name}/{found.version}"
        with self._lock:
            self._pinned[alias_uri] = (time.monotonic(), concrete)
        return concrete

    def allows(self, model_id: str) -> bool:
        """Whether a replica may load `model_id`: a catalog URI, or a version of a registered model the catalog names
        by alias."""
        if model_id in self.uris.values():
            return True
        if model_id.startswith("models:/") and "@" not in model_id:
            registered = model_id.removeprefix("models:/").strip("/").rsplit("/", 1)[0]
            return any((parts := _alias_parts(uri)) is not None and parts[0] == registered for uri in self.uris.values())
        return False

    def name_of(self, model_id: str) -> str | None:
        """The public name a concrete model id is served under (an alias's versions under the alias's name)."""
        for name, uri in self.uris.items():
            if uri == model_id or ((parts := _alias_parts(uri)) is not None and model_id.startswith(f"models:/{parts[0]}/")):
                return name
        return None
