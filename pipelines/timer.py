"""Per-stage busy time, reported by the stage UDFs to one small actor, for the summary's rows/s per stage."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class StageTimer:
    def __init__(self):
        self.rows: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.read_errors: dict[str, int] = {}

    def add(self, stage: str, rows: int, seconds: float) -> None:
        self.rows[stage] = self.rows.get(stage, 0) + rows
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def count_reads(self, stage: str, rows: int, read_errors: int) -> tuple[int, int]:
        """Count read rows and their read errors; the running totals (the read-error share check)."""
        self.add(stage, rows, 0.0)
        self.read_errors[stage] = self.read_errors.get(stage, 0) + read_errors
        return self.rows[stage], self.read_errors[stage]

    def totals(self) -> dict[str, tuple[int, float]]:
        return {stage: (self.rows[stage], self.seconds[stage]) for stage in self.rows}


# Stages call `ray.get(timer.add.remote(...))`: waiting for the acknowledgement (about a millisecond a batch)
# guarantees every count has landed before the driver reads the totals; fire-and-forget calls could still be
# in flight when the write finishes, and the source count must be exact.


def start_stage_timer():
    """A job's StageTimer, on the driver's node: on a worker node it would die with that node and fail every stage
    that reports to it."""
    from runtime.resources import on_the_drivers_node

    return StageTimer.options(**on_the_drivers_node()).remote()
