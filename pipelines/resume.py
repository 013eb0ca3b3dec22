"""Resume: which sources an earlier run of the same job already finished, as notes for `pipelines.known_sources`
(joined onto the units of work, so finished sources are skipped before any of their bytes are read).

Every job's output names its sources: data build's shards/ and rejects/, index build's embeddings/ and rejects/,
restore-batch's results/ and rejects/. A source is finished when it is in a rejects table or a results table, or,
for `data build`, when all of its K variants are in shards/ (`per_source_rows`). The tables are read in Ray tasks
(`pipelines.outputs.table_dataset`); the per-source count is a Ray Data groupby above `known_sources.SMALL_ROWS`
rows and one task below. Sources written only in part (an interruption between two of a source's write tasks,
which the sink makes rare) are read again and their sample ids already written are skipped by the sink: only
those ids come back to the driver, a number bounded by what was in flight when the job stopped, not by the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.duplicates import partitions_for
from pipelines.known_sources import SMALL_ROWS, as_notes
from pipelines.outputs import table_dataset
from pipelines.rows import concat_blocks
from runtime.config import StorageConfig


@dataclass
class Finished:
    notes: ray.data.Dataset | None  # NOTE_SCHEMA rows with a null reason: one per finished source
    count: int
    partial_ids: frozenset[str]  # sample ids of sources written only in part


def _photos(batch: pa.Table) -> pa.Table:
    # Generated negatives are samples without a source: resume regenerates them by id (build_dataset).
    return batch.filter(pc.not_equal(batch.column("kind"), "negative"))


def _split_by_count(samples: pa.Table, variants: int) -> tuple[pa.Table, list[str]]:
    """(the sources with all `variants` samples, the sample ids of the others)."""
    counts = samples.group_by("source").aggregate([("id", "count")])
    complete = counts.filter(pc.greater_equal(counts.column("id_count"), variants)).select(["source"])
    partial = counts.filter(pc.less(counts.column("id_count"), variants)).column("source")
    return complete, samples.filter(pc.is_in(samples.column("source"), partial)).column("id").to_pylist()


@ray.remote(num_cpus=1, num_returns=2)
def _split_in_one_task(blocks: list, variants: int):
    schema = pa.schema([("source", pa.string()), ("id", pa.string()), ("kind", pa.string())])
    samples = _photos(concat_blocks(ray.get(blocks), schema))
    complete, partial_ids = _split_by_count(samples, variants)
    return as_notes(complete), partial_ids


def finished_sources(
    fs, root: str, output_uri: str, storage: StorageConfig, tables: tuple[str, ...], per_source_rows: tuple[str, int] | None = None
) -> Finished:
    """The sources finished in `tables` (every source named there), plus, for `per_source_rows` = (table, K), the
    sources with K rows in that table."""
    parts: list[ray.data.Dataset] = []
    count = 0
    for name in tables:
        found = table_dataset(fs, root, output_uri, name, ["source"], storage)
        if found is not None:
            parts.append(found[0].map_batches(as_notes, batch_format="pyarrow"))
            count += found[1]
    partial_ids: list[str] = []
    if per_source_rows is not None:
        found = table_dataset(fs, root, output_uri, per_source_rows[0], ["source", "id", "kind"], storage)
        if found is not None:
            samples, rows = found
            variants = per_source_rows[1]
            if rows <= SMALL_ROWS:
                complete_ref, ids_ref = _split_in_one_task.remote(samples.to_arrow_refs(), variants)
                complete = ray.data.from_arrow_refs([complete_ref])
                partial_ids = ray.get(ids_ref)
            else:
                photos = samples.map_batches(_photos, batch_format="pyarrow")
                counts = photos.groupby("source", num_partitions=partitions_for(rows)).count().materialize()

                def where(compare):
                    return lambda batch: batch.filter(compare(batch.column("count()"), variants)).select(["source"])

                complete = counts.map_batches(where(pc.greater_equal), batch_format="pyarrow").map_batches(as_notes, batch_format="pyarrow")
                partial = [row["source"] for row in counts.map_batches(where(pc.less), batch_format="pyarrow").take_all()]
                if partial:
                    wanted = pa.array(partial, pa.string())
                    partial_ids = [
                        row["id"]
                        for row in photos.map_batches(
                            lambda b: b.filter(pc.is_in(b.column("source"), wanted)), batch_format="pyarrow"
                        ).take_all()
                    ]
            complete = complete.materialize()
            parts.append(complete)
            count += complete.count()
    if not parts:
        return Finished(None, 0, frozenset())
    notes = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return Finished(notes, count, frozenset(partial_ids))
