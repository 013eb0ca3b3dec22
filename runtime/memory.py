"""A process's peak private memory, for a job's manifest.

`ru_maxrss` counts every resident page of the process, including object-store pages Ray maps in when a task reads a
block (they are the store's, counted against `object_store_memory`) and file pages of a memory-mapped file (the page
cache's). What a task costs its node beyond those is its anonymous memory (Linux: RssAnon), sampled here by a thread;
elsewhere the peak RSS stands in for it."""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path

STATUS = Path("/proc/self/status")


def private_bytes() -> int | None:
    """RssAnon of this process now, or None where /proc does not say it."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PrivateMemoryPeak:
    """`with PrivateMemoryPeak(every_s) as peak: ...` then `peak.bytes`: the largest private memory seen while the
    block ran (sampled, so a spike shorter than `every_s` can be missed)."""

    def __init__(self, every_s: float = 0.02):
        self.every_s = every_s
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = private_bytes()
        if now is not None:
            self.bytes = max(self.bytes, now)

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> PrivateMemoryPeak:
        if private_bytes() is None:
            return self
        self._sample()
        self._thread = threading.Thread(target=self._watch, name="private-memory-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            return
        self._stop.set()
        self._thread.join()
        self._sample()
