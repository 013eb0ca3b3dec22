"""The read pass every job starts with: listed units of work -> source rows -> (decode -> basic quality).

`source_rows` reads the units in Ray tasks (pipelines/sources.py), `read_stage` counts what was read and stops the
job when too much of it could not be (the read-error share), `front_stages` decodes and applies basic quality.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from pipelines.config import DataBuildConfig
from pipelines.rows import batch_of, is_rejected, row_stage, rows_of
from pipelines.sources import read_units
from pipelines.stages.decode import decode_row
from pipelines.stages.quality import quality_row
from pipelines.timer import report
from restoration.errors import InputError, RestorayError
from runtime.config import StorageConfig
from runtime.storage import find_cause, storage_cause


class BuildStopped(RestorayError):
    """The job stopped while working for a reason that is not one source's (exit 1)."""


@contextmanager
def plain_job_errors() -> Iterator[None]:
    """Ray wraps what a task raised (posing as it): a storage failure, a stopped build or bad input found in a task is
    raised as its plain self, not as a remote traceback (every job of this package runs its Ray Data work inside this)."""
    try:
        yield
    except Exception as err:
        cause = storage_cause(err) or find_cause(err, BuildStopped) or find_cause(err, InputError)
        if cause is not None and cause is not err:
            raise cause from None
        raise


def source_rows(
    units: ray.data.Dataset, count: int, config: DataBuildConfig, storage: StorageConfig, only_noted: bool = False
) -> ray.data.Dataset:
    """The rows of `count` units of work (a Dataset of pipelines.listing.UNIT_SCHEMA, maybe with `known`), read in
    at most `data.source.read_parallelism` x 4 tasks; `only_noted`: only the sources the units' notes name."""
    blocks = max(1, min(count, config.source.read_parallelism * 4))
    return units.repartition(blocks).map_batches(
        read_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"config": config.source, "storage": storage, "only_noted": only_noted}
    )


def read_stage(timer, label: str, config: DataBuildConfig):
    """Counts the rows read (for rates) and stops the job (BuildStopped) when more than
    data.source.max_read_error_share of the sources read so far are read errors, once read_error_min_sources were
    read. Only a batch holding read errors waits for the running totals: a healthy corpus never calls the timer
    synchronously."""
    max_share, min_sources = config.source.max_read_error_share, config.source.read_error_min_sources

    def udf(batch: dict) -> dict:
        rows = rows_of(batch)
        read_errors = sum(1 for row in rows if (row.get("error") or "").startswith("read_error"))
        if not read_errors:
            report(timer, label, len(rows), 0.0)  # counted, not timed: reading happens in read_units
            return batch
        total, total_errors = ray.get(timer.count_reads.remote(label, len(rows), read_errors))
        if total >= min_sources and total_errors > max_share * total:
            raise BuildStopped(
                f"{total_errors} of the first {total} sources could not be read (read_error), more than "
                f"data.source.max_read_error_share = {max_share:g}: the corpus or its storage is broken, not a few files; "
                f"fix it and rerun (add --retry-rejected read_error to read the rejected ones again)"
            )
        return batch

    return udf


def front_stages(dataset: ray.data.Dataset, config: DataBuildConfig, timer, prefix: str = "") -> ray.data.Dataset:
    max_chars = config.source.max_caption_chars

    def decode(row: dict) -> dict:
        return decode_row(row, config.decode, max_chars)

    # Decode must also see rows with read errors (to turn them into rejects), so it is not a row_stage.
    def decode_udf(batch: dict) -> dict:
        started = time.perf_counter()
        rows = [decode(row) if not is_rejected(row) else row for row in rows_of(batch)]
        report(timer, prefix + "decode", len(rows), time.perf_counter() - started)
        return batch_of(rows)

    return dataset.map_batches(decode_udf, batch_size=8).map_batches(
        row_stage(prefix + "quality", lambda row: quality_row(row, config.quality), timer), batch_size=8
    )
