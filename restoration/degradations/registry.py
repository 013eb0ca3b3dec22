"""Registry of degradation types (ABAIR's experts are one per type).

Each type has a stable explicit id (never assigned by registration order; 0 means clean), a name, a severity
range, a prompt phrase (`prompt(params)` gives the exact op, `phrase` its shape for listings), and
`apply(image, severity, rng) -> (image, params)`. The id->name map is written into
every dataset manifest, and LoRA experts and the estimator index types by id, so ids never change.

Plugins: a package registers more types through the entry-point group `restoray.degradations`; each entry
point names a `DegradationType` or a callable returning one or a list of them. Entry points are read from the
installed distributions, so every Ray worker with the plugin installed sees the same registry.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

import numpy as np

from restoration.prompts import PromptOp

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "restoray.degradations"
CLEAN_ID = 0


@dataclass(frozen=True)
class DegradationType:
    """One degradation type. `apply` takes HxWx3 uint8 or float32 and returns float32 or uint8 plus its params."""

    id: int
    name: str
    severity: tuple[float, float]
    apply: Callable[[np.ndarray, float, np.random.Generator], tuple[np.ndarray, dict]]
    prompt: Callable[[dict], PromptOp]
    phrase: str
    description: str = ""

    def __post_init__(self):
        if not 1 <= self.id <= 255:
            raise ValueError(f"degradation type {self.name!r}: id must be in 1..255 (0 is clean, masks are uint8), got {self.id}")
        if self.severity[0] > self.severity[1]:
            raise ValueError(f"degradation type {self.name!r}: severity range {self.severity} is reversed")

    def draw_severity(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(*self.severity))


class DegradationRegistry:
    def __init__(self):
        self._by_id: dict[int, DegradationType] = {}
        self._by_name: dict[str, DegradationType] = {}
        self._plugins_loaded = False

    def register(self, degradation: DegradationType) -> None:
        existing = self._by_id.get(degradation.id)
        if existing is not None and existing is not degradation:
            raise ValueError(f"degradation id {degradation.id} is taken by {existing.name!r}; {degradation.name!r} needs another id")
        if degradation.name in self._by_name and self._by_name[degradation.name] is not degradation:
            raise ValueError(f"degradation name {degradation.name!r} is already registered")
        self._by_id[degradation.id] = degradation
        self._by_name[degradation.name] = degradation

    def load_plugins(self, force: bool = False) -> None:
        """The built-in types (restoration.degradations.types registers them on import), then the entry points'."""
        if self._plugins_loaded and not force:
            return
        self._plugins_loaded = True
        importlib.import_module("restoration.degradations.types")  # imported here: that module imports this one
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            loaded = entry_point.load()
            items = loaded() if callable(loaded) and not isinstance(loaded, DegradationType) else loaded
            for item in items if isinstance(items, list | tuple) else [items]:
                if not isinstance(item, DegradationType):
                    raise TypeError(
                        f"entry point {entry_point.name!r} in {ENTRY_POINT_GROUP!r} gave {type(item).__name__}, not a DegradationType"
                    )
                self.register(item)
                log.debug("registered degradation plugin %s (id %d) from %s", item.name, item.id, entry_point.value)

    def all(self) -> list[DegradationType]:
        self.load_plugins()
        return [self._by_id[i] for i in sorted(self._by_id)]

    def get(self, key: int | str) -> DegradationType:
        self.load_plugins()
        found = self._by_id.get(key) if isinstance(key, int) else self._by_name.get(key)
        if found is None:
            known = ", ".join(f"{t.id}={t.name}" for t in self.all())
            raise KeyError(f"unknown degradation type {key!r}; known: {known}")
        return found

    def id_to_name(self) -> dict[int, str]:
        return {CLEAN_ID: "clean", **{t.id: t.name for t in self.all()}}


REGISTRY = DegradationRegistry()


def register(degradation: DegradationType) -> DegradationType:
    REGISTRY.register(degradation)
    return degradation
