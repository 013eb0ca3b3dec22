"""One Datasink for the build's tables: accepted samples to `shards/`, their sources' CLIP embeddings to
`embeddings/`, rejected sources to `rejects/`.

Each write task sorts its rows by source and writes files of at most `max_rows_per_shard` rows, cutting only
between sources, each to a temporary name renamed into place once written: a source's rows become visible
together or not at all, which is what resume relies on. Sample ids already in the output (a source cut in two
by an interruption) are skipped, so a resumed build never duplicates rows.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

from restoration.dataset import EMBEDDING_SCHEMA, REJECT_SCHEMA, SAMPLE_SCHEMA, source_id
from runtime.config import StorageConfig
from runtime.storage import filesystem, retrying


class CountingSink(Datasink):
    """A Datasink whose write tasks return counts (a dict of ints) and whose `totals` sums them once the write is
    done: a job's exact counts of this run, without a call per row or batch to any actor. (Ray gathers every write
    task's return value in the driver anyway; a few ints per task add nothing that grows with the corpus.)"""

    totals: dict[str, int]

    def on_write_complete(self, write_result) -> None:
        totals: dict[str, int] = {}
        for counts in write_result.write_returns:
            for name, value in (counts or {}).items():
                totals[name] = totals.get(name, 0) + int(value)
        self.totals = totals


class ShardSink(CountingSink):
    def __init__(
        self, output: str, storage: StorageConfig, max_rows_per_shard: int, existing_ids: frozenset[str], fail_after_rows: int = 0
    ):
        self.output = output.rstrip("/")
        self.storage = storage
        self.max_rows = max_rows_per_shard
        self.existing_ids = existing_ids
        self.fail_after_rows = fail_after_rows  # runtime.faults' build.fail_after_rows (tests)
        self.totals = {}

    def get_name(self) -> str:
        return "ShardSink"

    def write(self, blocks, ctx) -> dict[str, int]:
        samples: list[dict] = []
        rejects: list[dict] = []
        embeddings: dict[str, bytes] = {}
        sources = 0  # arriving this run: each rejected row, and each accepted source's variant 0
        for row in block_rows(blocks):
            if row.get("reject_reason"):
                rejects.append(reject_row(row))
                sources += 1
            else:
                sources += row.get("variant") == 0
                if row["id"] not in self.existing_ids:
                    samples.append({field.name: row.get(field.name) for field in SAMPLE_SCHEMA})
                if row.get("embedding") is not None:
                    embeddings[row["source"]] = row["embedding"]
        fail_after = self.fail_after_rows
        committed = 0
        for table, rows, schema in (("shards", samples, SAMPLE_SCHEMA), ("rejects", rejects, REJECT_SCHEMA)):
            # A source's rows in the order of their content (the id hashes the URI, which differs by machine).
            rows.sort(key=lambda row: (row["source"], hashlib.sha256(row.get("lq") or b"").digest()))
            for part in _split_between_sources(rows, self.max_rows):
                self._commit(table, pa.Table.from_pylist(part, schema=schema))
                committed += len(part)
                if fail_after and committed >= fail_after:
                    raise RuntimeError(f"fault build.fail_after_rows={fail_after}: stopping after {committed} rows")
        if embeddings:
            # After the shards: a source's embedding is written once its samples are (a resumed build may write it twice).
            rows = [{"id": source_id(source), "source": source, "embedding": value} for source, value in embeddings.items()]
            rows.sort(key=lambda row: row["id"])
            for start in range(0, len(rows), self.max_rows):
                commit_table(
                    self.output,
                    self.storage,
                    "embeddings",
                    pa.Table.from_pylist(rows[start : start + self.max_rows], schema=EMBEDDING_SCHEMA),
                    "id",
                )
        return {"sources": sources, "samples": len(samples), "rejects": len(rejects)}

    def _commit(self, table_name: str, table: pa.Table) -> None:
        commit_table(self.output, self.storage, table_name, table, "lq" if "lq" in table.column_names else "source")


def block_rows(blocks) -> Iterator[dict]:
    """The rows of a write task's blocks as plain dicts (None where pandas blocks carry NaN)."""
    for block in blocks:
        table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
        for row in table.to_pylist():
            yield {key: _none_for_nan(value) for key, value in row.items()}


def reject_row(row: dict) -> dict:
    """A rejected row as a rejects-table row (REJECT_SCHEMA)."""
    return {"source": row["source"], "stage": row["reject_stage"], "reason": row["reject_reason"], "detail": row["reject_detail"]}


def commit_table(output: str, storage: StorageConfig, table_name: str, table: pa.Table, key_column: str, row_group_size=None) -> str:
    """Write `table` as OUTPUT/table_name/part-<hash of its key column>.parquet through a temporary name; returns the
    file's name. Named by content: the same rows give the same file wherever they were built (a build's shards,
    and a training run reading them in order, reproduce), and a retried write overwrites its own file."""
    fs, root = filesystem(output, storage)
    digest = hashlib.sha256()
    for value in table.column(key_column).to_pylist():
        digest.update(hashlib.sha256(value if isinstance(value, bytes) else str(value).encode()).digest())
    name = f"part-{digest.hexdigest()[:24]}.parquet"
    final = f"{root}/{table_name}/{name}"
    partial = f"{root}/{table_name}/.{name}.partial"

    def write() -> None:  # idempotent: a retry rewrites the same partial file
        fs.makedirs(f"{root}/{table_name}", exist_ok=True)
        with fs.open(partial, "wb") as handle:
            pq.write_table(table, handle, compression="zstd", row_group_size=row_group_size)
        fs.mv(partial, final)

    retrying(write, f"{output}/{table_name}/{name}", storage, "write")
    return name


def _none_for_nan(value):
    # Blocks that went through pandas carry NaN for missing values.
    return None if isinstance(value, float) and math.isnan(value) else value


def _split_between_sources(rows: list[dict], max_rows: int) -> list[list[dict]]:
    parts: list[list[dict]] = []
    current: list[dict] = []
    for index, row in enumerate(rows):
        current.append(row)
        next_source = rows[index + 1]["source"] if index + 1 < len(rows) else None
        if len(current) >= max_rows and next_source != row["source"]:
            parts.append(current)
            current = []
    if current:
        parts.append(current)
    return parts
