"""Per-stage busy time, for the summary's rows/s per stage: reported in batches, asynchronously, to one small actor.

A stage UDF calls `report(timer, stage, rows, seconds)`; the counts gather in the worker process and go to the
StageTimer as one fire-and-forget call per process at most every FLUSH_S seconds (and at once for a stage's first
batch, so a short job still shows every stage): no call per row or batch waits on the actor. The totals are for
rates, which a late or lost last report leaves true; the exact counts of a job come from its sink's write results
(`pipelines.sink.CountingSink`), and the read-error stop from `count_reads`, which a read task awaits only for a
batch that holds read errors (a healthy corpus never waits).
"""

from __future__ import annotations

import os
import time

import ray

# Seconds between a process's reports; benches that time each batch set RESTORAY_TIMER_FLUSH_S=0 in the workers.
FLUSH_S = float(os.environ.get("RESTORAY_TIMER_FLUSH_S", "1.0"))


@ray.remote(num_cpus=0)
class StageTimer:
    def __init__(self):
        self.rows: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.read_errors: dict[str, int] = {}

    def add(self, counts: dict[str, tuple[int, float]]) -> None:
        for stage, (rows, seconds) in counts.items():
            self.rows[stage] = self.rows.get(stage, 0) + rows
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def count_reads(self, stage: str, rows: int, read_errors: int) -> tuple[int, int]:
        """Count read rows and their read errors; the running totals (the read-error share check)."""
        self.read_errors[stage] = self.read_errors.get(stage, 0) + read_errors
        self.add({stage: (rows, 0.0)})
        return self.rows[stage], self.read_errors[stage]

    def totals(self) -> dict[str, tuple[int, float]]:
        return {stage: (self.rows[stage], self.seconds[stage]) for stage in self.rows}


class _Pending:
    """One worker process's unreported counts for one timer."""

    def __init__(self):
        self.counts: dict[str, tuple[int, float]] = {}
        self.flushed = 0.0
        self.seen: set[str] = set()


_pending: dict[bytes, _Pending] = {}


def report(timer, stage: str, rows: int, seconds: float) -> None:
    """Add a batch's rows and busy seconds to `stage`; sent to the timer without waiting, batched per process."""
    if timer is None:
        return
    key = timer._actor_id.binary()
    pending = _pending.setdefault(key, _Pending())
    old_rows, old_seconds = pending.counts.get(stage, (0, 0.0))
    pending.counts[stage] = (old_rows + rows, old_seconds + seconds)
    now = time.monotonic()
    if stage not in pending.seen or now - pending.flushed >= FLUSH_S:
        pending.seen.add(stage)
        timer.add.remote(pending.counts)
        pending.counts, pending.flushed = {}, now


def start_stage_timer():
    """A job's StageTimer, on the driver's node: on a worker node it would die with that node and fail every stage
    that reports to it."""
    from runtime.resources import on_the_drivers_node

    return StageTimer.options(**on_the_drivers_node()).remote()
