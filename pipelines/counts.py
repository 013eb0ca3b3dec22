"""A job's output counted where it lies: rejects by reason, samples by kind, distinct accepted sources, and the two
consistency checks (no sample id twice; no source both accepted and rejected, or rejected twice).

Above `known_sources.SMALL_ROWS` rows the counts are Ray Data aggregations (groupby + count over the output
tables, read in Ray tasks; only the per-group counts, a few numbers, come back); below it one Ray task counts with
pyarrow (a shuffle's aggregators cost seconds and spread nothing at that size). Both give the same numbers
(tests/integration/test_build_dataset.py). Never a column of the corpus in the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.duplicates import partitions_for
from pipelines.known_sources import SMALL_ROWS
from pipelines.outputs import table_dataset
from pipelines.rows import concat_blocks
from runtime.config import StorageConfig

NEGATIVE = "negative"
SAMPLE_COUNT_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("kind", pa.string())])
REJECT_COUNT_SCHEMA = pa.schema(
    [("source", pa.string()), ("reason", pa.string())]
)  # generated negatives: samples without a source, out of the source accounting


@dataclass
class OutputCounts:
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    samples_by_kind: dict[str, int] = field(default_factory=dict)
    accepted_sources: int = 0  # distinct sources of the samples, generated negatives excluded
    repeated_ids: int = 0  # sample ids written more than once
    rejected_twice: int = 0  # sources in rejects more than once
    accepted_and_rejected: int = 0  # sources both in the samples and in rejects

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    @property
    def samples(self) -> int:
        return sum(self.samples_by_kind.values())


def _count_tables(samples: pa.Table | None, rejects: pa.Table | None) -> OutputCounts:
    counts = OutputCounts()
    reject_sources = pa.array([], pa.string())
    if rejects is not None and rejects.num_rows:
        by_reason = rejects.group_by("reason").aggregate([("source", "count")])
        counts.rejected_by_reason = dict(
            zip(by_reason.column("reason").to_pylist(), by_reason.column("source_count").to_pylist(), strict=True)
        )
        distinct = pc.unique(rejects.column("source"))
        counts.rejected_twice = rejects.num_rows - len(distinct)
        reject_sources = distinct
    if samples is not None and samples.num_rows:
        by_kind = samples.group_by("kind").aggregate([("id", "count")])
        counts.samples_by_kind = dict(zip(by_kind.column("kind").to_pylist(), by_kind.column("id_count").to_pylist(), strict=True))
        counts.repeated_ids = samples.num_rows - len(pc.unique(samples.column("id")))
        photos = pc.unique(samples.filter(pc.not_equal(samples.column("kind"), NEGATIVE)).column("source"))
        counts.accepted_sources = len(photos)
        counts.accepted_and_rejected = int(pc.sum(pc.is_in(photos, reject_sources)).as_py() or 0)
    return counts


@ray.remote(num_cpus=1)
def _count_in_one_task(sample_blocks: list | None, reject_blocks: list | None) -> OutputCounts:
    samples = concat_blocks(ray.get(sample_blocks), SAMPLE_COUNT_SCHEMA) if sample_blocks else None
    rejects = concat_blocks(ray.get(reject_blocks), REJECT_COUNT_SCHEMA) if reject_blocks else None
    return _count_tables(samples, rejects)


def _group_counts(dataset: ray.data.Dataset, key: str, partitions: int) -> ray.data.Dataset:
    return dataset.groupby(key, num_partitions=partitions).count()


def count_output(
    fs, root: str, output_uri: str, storage: StorageConfig, samples_table: str | None, *, partitions: int | None = None
) -> OutputCounts:
    """Counts of `samples_table` (id, source, kind; None: the job writes no samples) and rejects/. `partitions`
    forces the aggregation path (tests)."""
    samples = table_dataset(fs, root, output_uri, samples_table, ["id", "source", "kind"], storage) if samples_table else None
    rejects = table_dataset(fs, root, output_uri, "rejects", ["source", "reason"], storage)
    rows = (samples[1] if samples else 0) + (rejects[1] if rejects else 0)
    if partitions is None and rows <= SMALL_ROWS:
        return ray.get(
            _count_in_one_task.remote(samples[0].to_arrow_refs() if samples else None, rejects[0].to_arrow_refs() if rejects else None)
        )
    partitions = partitions or partitions_for(rows)
    counts = OutputCounts()
    reject_sources = None
    if rejects is not None:
        counts.rejected_by_reason = {row["reason"]: row["count()"] for row in _group_counts(rejects[0], "reason", partitions).take_all()}
        per_source = _group_counts(rejects[0], "source", partitions).materialize()
        counts.rejected_twice = rejects[1] - per_source.count()
        reject_sources = per_source.select_columns(["source"])
    if samples is not None:
        dataset = samples[0]
        counts.samples_by_kind = {row["kind"]: row["count()"] for row in _group_counts(dataset, "kind", partitions).take_all()}
        counts.repeated_ids = samples[1] - _group_counts(dataset, "id", partitions).count()
        photos = dataset.map_batches(lambda b: b.filter(pc.not_equal(b.column("kind"), NEGATIVE)), batch_format="pyarrow")
        accepted = _group_counts(photos, "source", partitions).select_columns(["source"]).materialize()
        counts.accepted_sources = accepted.count()
        if reject_sources is not None:
            counts.accepted_and_rejected = accepted.join(reject_sources, "inner", num_partitions=partitions, on=("source",)).count()
    return counts
