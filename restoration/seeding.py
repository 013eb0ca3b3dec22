"""The one seeding helper: every derived seed in the project is `stable_seed(*parts)`.

A derived seed must not depend on Python's per-process string hashing, on the order things were built in, or on
which process computes it (Ray workers, data-parallel ranks): it is a hash of the parts' text. Callers name what
they seed (`stable_seed(preset_seed, "adaptor")`, `stable_seed(run_seed, "crop", row_id)`), so two purposes never
share a stream by accident.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np
import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text (fits torch.manual_seed and numpy)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


def numpy_generator(*parts: object) -> np.random.Generator:
    return np.random.default_rng(stable_seed(*parts))


def torch_generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*parts))


@contextlib.contextmanager
def torch_seeded(*parts: object) -> Iterator[None]:
    """Run a block (building a network with random init) on torch's global RNG seeded from the parts, then put the
    caller's RNG state back: building one network never shifts another's weights or the caller's randomness."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed(*parts))
        yield
