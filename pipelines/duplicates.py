"""Exact and perceptual duplicates as Ray Data operations: the dataset build's first global pass, with nothing the size
of the corpus in one process.

Input: a Dataset of the scan, one row per image that passed decoding and basic quality: (source, sha256, phash).
- exact: `groupby("sha256")`; in each group the smallest source URI is kept, the others are `duplicate` rejects;
- perceptual, over the exact pass's survivors: each hash becomes four rows, one per 16-bit band (key band << 16 |
  value); `groupby("band_key")` puts every pair that shares a band in one bucket, where the Hamming distances are
  computed vectorised in blocks (XOR and popcount) and only the pairs within `max_hamming` leave the task: candidate
  pairs never become rows. Two hashes within distance 3 always share a band (4 bands, pigeonhole);
- components: one Ray task runs union-find over the match edges (a few per duplicate); in each component the
  smallest URI is kept and the others are `near_duplicate` rejects, named with their distance to the kept one.
The decisions equal `pipelines.stages.dedup.find_duplicates` (the single-process reference) on the same scan: same
keeper, reasons and details, whatever order the rows arrive in.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from pipelines.config import DedupConfig
from pipelines.rows import concat_blocks

BANDS, BAND_BITS = 4, 16
BLOCK = 1024  # rows of a bucket compared at once: a BLOCK x bucket matrix of distances
DECISION_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
SURVIVOR_SCHEMA = pa.schema([("source", pa.string()), ("phash", pa.int64())])
EDGE_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("a_phash", pa.int64()), ("b_phash", pa.int64())])


def _exact_group(group: pa.Table) -> pa.Table:
    """One sha256 group -> its rows with `kept_as`: null for the smallest URI, else that URI."""
    order = np.argsort(np.asarray(group.column("source").to_pylist(), dtype=object), kind="stable")
    sources = [group.column("source")[int(i)].as_py() for i in order]
    phashes = [group.column("phash")[int(i)].as_py() for i in order]
    return pa.table(
        {"source": sources, "phash": phashes, "kept_as": [None] + [sources[0]] * (len(sources) - 1)},
        schema=pa.schema([("source", pa.string()), ("phash", pa.int64()), ("kept_as", pa.string())]),
    )


def _bands(batch: pa.Table) -> pa.Table:
    """Each survivor four times, keyed by band and band value."""
    phash = batch.column("phash").to_numpy().view(np.uint64)
    keys = [
        (np.uint64(band) << np.uint64(BAND_BITS)) | ((phash >> np.uint64(BAND_BITS * band)) & np.uint64(0xFFFF)) for band in range(BANDS)
    ]
    return pa.table(
        {
            "band_key": pa.array(np.concatenate(keys).astype(np.int64)),
            "source": pa.concat_arrays([batch.column("source").combine_chunks()] * BANDS),
            "phash": pa.concat_arrays([batch.column("phash").combine_chunks()] * BANDS),
        }
    )


def _matches(bucket: pa.Table, max_hamming: int) -> pa.Table:
    """The pairs of one band bucket within `max_hamming` bits (a < b by URI), computed a block of rows at a time."""
    count = bucket.num_rows
    if count < 2:
        return EDGE_SCHEMA.empty_table()
    sources = np.asarray(bucket.column("source").to_pylist(), dtype=object)
    hashes = bucket.column("phash").to_numpy().view(np.uint64)
    firsts, seconds = [], []
    for start in range(0, count, BLOCK):
        block = hashes[start : start + BLOCK]
        distances = np.bitwise_count(block[:, None] ^ hashes[None, :])
        rows, cols = np.nonzero(distances <= max_hamming)
        rows = rows + start
        later = cols > rows  # each unordered pair once, never a row with itself
        firsts.append(rows[later])
        seconds.append(cols[later])
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    swap = sources[first] > sources[second]
    a, b = np.where(swap, second, first), np.where(swap, first, second)
    return pa.table(
        {"a": sources[a].tolist(), "b": sources[b].tolist(), "a_phash": hashes[a].view(np.int64), "b_phash": hashes[b].view(np.int64)},
        schema=EDGE_SCHEMA,
    )


def groups_of(table: pa.Table, key: str):
    """The groups of a table by one key column, each a table (a task's own grouping: no shuffle)."""
    if table.num_rows == 0:
        return
    table = table.sort_by(key)
    keys = table.column(key).to_numpy(zero_copy_only=False)
    bounds = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    for start, stop in zip([0, *bounds.tolist()], [*bounds.tolist(), len(keys)], strict=True):
        yield table.slice(start, stop - start)


def _components(edge_batches) -> list[tuple[str, str, str]]:
    """Union-find over the match edges; every member of a component but its smallest URI becomes a near_duplicate."""
    parent: dict[str, str] = {}
    phash: dict[str, int] = {}

    def root(node: str) -> str:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for batch in edge_batches:
        for a, b, a_hash, b_hash in zip(*(batch.column(name).to_pylist() for name in ("a", "b", "a_phash", "b_phash")), strict=True):
            for node, value in ((a, a_hash), (b, b_hash)):
                if node not in parent:
                    parent[node], phash[node] = node, value
            first, second = root(a), root(b)
            if first != second:
                parent[max(first, second)] = min(first, second)  # the smaller URI stays the root: it is the one kept
    decisions = []
    for node in parent:
        keeper = root(node)
        if keeper != node:
            distance = int(np.bitwise_count(np.uint64(phash[node] & 0xFFFFFFFFFFFFFFFF) ^ np.uint64(phash[keeper] & 0xFFFFFFFFFFFFFFFF)))
            decisions.append((node, "near_duplicate", f"perceptual hash {distance} bits from {keeper}"))
    return decisions


def _decision_table(decisions: list[tuple[str, str, str]]) -> pa.Table:
    return pa.table([list(column) for column in zip(*decisions, strict=True)] or [[], [], []], schema=DECISION_SCHEMA)


def _exact_decisions(batch: pa.Table) -> pa.Table:
    repeats = _kept(batch, False)
    details = [f"same bytes as {kept}" for kept in repeats.column("kept_as").to_pylist()]
    return pa.table(
        [repeats.column("source"), pa.array(["duplicate"] * repeats.num_rows, pa.string()), pa.array(details, pa.string())],
        schema=DECISION_SCHEMA,
    )


@ray.remote(num_cpus=1)
def _components_task(edges: ray.data.Dataset) -> pa.Table:
    return _decision_table(_components(edges.iter_batches(batch_format="pyarrow", batch_size=65536)))


@ray.remote(num_cpus=1)
def _one_task(blocks: list[ray.ObjectRef], config: DedupConfig) -> pa.Table:
    """The whole pass in one task, grouping in the task: for scans small enough that a shuffle costs more than it
    spreads (its aggregators and per-partition tasks add seconds). The same per-group functions as the shuffle path."""
    scan = concat_blocks(ray.get(blocks), pa.schema([("source", pa.string()), ("sha256", pa.string()), ("phash", pa.int64())]))
    decisions: list[pa.Table] = [DECISION_SCHEMA.empty_table()]
    survivors = scan.select(["source", "phash"])
    if config.exact:
        grouped = pa.concat_tables([_exact_group(group) for group in groups_of(scan, "sha256")] or [_exact_group(scan.slice(0, 0))])
        decisions.append(_exact_decisions(grouped))
        survivors = _kept(grouped, True).select(["source", "phash"])
    if config.perceptual:
        edges = [_matches(bucket, config.max_hamming) for bucket in groups_of(_bands(survivors), "band_key")]
        decisions.append(_decision_table(_components(edges)))
    return pa.concat_tables(decisions)


def _kept(batch: pa.Table, kept: bool) -> pa.Table:
    import pyarrow.compute as pc

    mask = pc.is_null(batch.column("kept_as"))
    return batch.filter(mask if kept else pc.invert(mask))


def partitions_for(rows: int, rows_per_partition: int = 500_000) -> int:
    """Hash-shuffle partitions of a global pass: enough to spread the work, few on small corpora (each is a task)."""
    return max(1, -(-rows // rows_per_partition))


def find_duplicates(scan: ray.data.Dataset, config: DedupConfig, partitions: int = 1) -> ray.data.Dataset:
    """The scan's (source, sha256, phash) rows -> a materialized Dataset of decisions (DECISION_SCHEMA: one row per
    rejected source), computed in Ray tasks over `partitions` hash partitions (1: the whole pass in one task, no
    shuffle). Nothing of it passes through the caller."""
    if partitions == 1:
        return ray.data.from_arrow_refs([_one_task.remote(scan.to_arrow_refs(), config)]).materialize()
    parts: list[ray.data.Dataset] = []
    if config.exact:
        grouped = scan.groupby("sha256", num_partitions=partitions).map_groups(_exact_group, batch_format="pyarrow").materialize()
        parts.append(grouped.map_batches(_exact_decisions, batch_format="pyarrow"))
        survivors = grouped.map_batches(_kept, fn_kwargs={"kept": True}, batch_format="pyarrow").select_columns(["source", "phash"])
    else:
        survivors = scan.select_columns(["source", "phash"])
    if config.perceptual:
        edges = (
            survivors.map_batches(_bands, batch_format="pyarrow")
            .groupby("band_key", num_partitions=partitions)
            .map_groups(_matches, fn_kwargs={"max_hamming": config.max_hamming}, batch_format="pyarrow")
            .materialize()
        )
        parts.append(ray.data.from_arrow_refs([_components_task.remote(edges)]))
    if not parts:
        return ray.data.from_arrow(DECISION_SCHEMA.empty_table())
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).materialize()


def as_dict(decisions: ray.data.Dataset) -> dict[str, tuple[str, str]]:
    """{source: (reason, detail)}: for tests and small corpora only (it gathers the decisions)."""
    return {row["source"]: (row["reason"], row["detail"]) for row in decisions.take_all()}
