"""Sources decided before they are read, joined onto the units of work that hold them: nothing per source in the driver.

A *note* (NOTE_SCHEMA) says one thing about one source:
- `reason` null: the source is finished (written or rejected by an earlier run): resume skips it unread;
- `reason` a reject reason: the source is rejected without being read (the dedup pass's duplicate decisions);
- `reason` "keep": the sources to read when the job reads only noted sources (an index built from a dataset: its
  accepted sources; `only_noted`);
- `reason` "stored": nothing decided; the note's `embedding` is the source's stored CLIP embedding (`index build
  --embeddings`), attached to its row by the read task so it is not computed again.
The notes are grouped by the unit that holds their source (`unit_of`: a folder's file, a parquet file, a tar) and
left-joined onto the units on the unit's path (Ray Data's hash join; `only_noted`: an inner join), so each read task
sees only the notes of its own unit (`known`, a list column). A folder unit whose source is finished, or a parquet
row group whose every row is, is dropped before any task opens it. A finished note wins over any other for the
same source (it is already in the output).

Below SMALL_ROWS units and notes together the join runs in one Ray task instead of a shuffle (the shuffle's
aggregators cost seconds, and spread nothing at that size); both paths give the same units (tests/integration).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.duplicates import partitions_for
from pipelines.listing import UNIT_SCHEMA, Listing
from pipelines.rows import concat_blocks

KEEP = "keep"
STORED = "stored"  # no decision: only carries the source's stored embedding
NOTE_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("embedding", pa.binary())])
KNOWN_TYPE = pa.list_(pa.struct(list(NOTE_SCHEMA)))
KNOWN_SCHEMA = UNIT_SCHEMA.append(pa.field("known", KNOWN_TYPE))
SMALL_ROWS = 500_000


def as_notes(batch: pa.Table, reason: str | None = None) -> pa.Table:
    """Rows with a `source` column as notes: `reason`, `detail` and `embedding` from the batch's own columns where it
    has them, else `reason` for every row and nulls (finished sources: reason None)."""
    count = batch.num_rows

    def column(name: str, type_: pa.DataType, default=None) -> pa.Array:
        if name in batch.column_names:
            return batch.column(name).combine_chunks().cast(type_)
        return pa.array([default] * count, type_)

    columns = [batch.column("source").combine_chunks(), column("reason", pa.string(), reason), column("detail", pa.string())]
    return pa.table([*columns, column("embedding", pa.binary())], schema=NOTE_SCHEMA)


def unit_of(source: str, fmt: str) -> str:
    """The path of the unit that holds `source`: the file itself (folders, and a container read as one reject), the
    parquet file of `file.parquet#row=N`, the tar of `shard.tar#key`."""
    if fmt == "parquet" and "#row=" in source:
        return source.rsplit("#row=", 1)[0]
    if fmt == "webdataset" and ".tar#" in source:
        return source[: source.index(".tar#") + 4]
    return source


def _priority(reason: str | None) -> int:
    """Which of two notes of one source decides: finished, then a reject decision, then keep, then stored."""
    return 3 if reason is None else 0 if reason == STORED else 1 if reason == KEEP else 2


def _grouped(notes: pa.Table, fmt: str) -> pa.Table:
    """Notes -> one row per unit path with its notes as a list (one note per source: the deciding one, keeping any
    stored embedding)."""
    by_unit: dict[str, dict[str, dict]] = {}
    for note in notes.to_pylist():
        known = by_unit.setdefault(unit_of(note["source"], fmt), {})
        previous = known.get(note["source"])
        if previous is not None:
            if _priority(previous["reason"]) > _priority(note["reason"]):
                note, previous = previous, note
            note = {**note, "embedding": note["embedding"] if note["embedding"] is not None else previous["embedding"]}
        known[note["source"]] = note
    return pa.table({"path": list(by_unit), "known": pa.array([list(known.values()) for known in by_unit.values()], KNOWN_TYPE)})


def _group_of_unit(group: pa.Table, fmt: str) -> pa.Table:
    return _grouped(group.drop_columns(["unit"]), fmt)


def _with_unit(batch: pa.Table, fmt: str) -> pa.Table:
    return batch.append_column("unit", pa.array([unit_of(source, fmt) for source in batch.column("source").to_pylist()], pa.string()))


def _still_to_read(units: pa.Table) -> pa.Table:
    """Drops the units with nothing left to read: a folder file that is finished, a row group whose rows all are."""
    keep = []
    for kind, path, offset, rows, known in zip(
        *(units.column(n).to_pylist() for n in ("kind", "path", "offset", "rows", "known")), strict=True
    ):
        finished = {note["source"] for note in known or () if note["reason"] is None}
        if kind in ("file", "unreadable"):
            keep.append(path not in finished)
        elif kind == "row_group":
            keep.append(any(f"{path}#row={offset + index}" not in finished for index in range(rows)))
        else:
            keep.append(True)
    return units.select(KNOWN_SCHEMA.names).cast(KNOWN_SCHEMA).filter(pa.array(keep, pa.bool_()))


def _only_noted(units: pa.Table) -> pa.Table:
    return units.filter(pc.invert(pc.is_null(units.column("known"))))


@ray.remote(num_cpus=1)
def _join_in_one_task(unit_blocks: list, note_blocks: list, fmt: str, only_noted: bool) -> pa.Table:
    units = concat_blocks(ray.get(unit_blocks), UNIT_SCHEMA)
    notes = concat_blocks(ray.get(note_blocks), NOTE_SCHEMA)
    # pyarrow's join refuses list columns: the small side as a dict by path (this path runs below SMALL_ROWS).
    grouped = _grouped(notes, fmt)
    by_path = dict(zip(grouped.column("path").to_pylist(), grouped.column("known").to_pylist(), strict=True))
    known = pa.array([by_path.get(path) for path in units.column("path").to_pylist()], KNOWN_TYPE)
    joined = units.append_column("known", known)
    joined = _still_to_read(joined)
    return _only_noted(joined) if only_noted else joined


def with_known(
    listing: Listing, notes: ray.data.Dataset | None, note_count: int, *, only_noted: bool = False, partitions: int | None = None
) -> Listing:
    """The listing's units with their notes (`known`), the units with nothing left to read dropped; materialized.
    `partitions`: hash partitions of the join (default: one task below SMALL_ROWS, else one per SMALL_ROWS)."""
    if notes is None or note_count == 0:
        if only_noted:
            return Listing(listing.format, listing.units.limit(0).materialize(), 0)
        units = listing.units.map_batches(
            lambda batch: batch.append_column("known", pa.nulls(batch.num_rows, KNOWN_TYPE)), batch_format="pyarrow"
        )
        return Listing(listing.format, units.materialize(), listing.count)
    rows = listing.count + note_count
    one_task = partitions is None and rows <= SMALL_ROWS
    partitions = partitions or partitions_for(rows)
    fmt = listing.format
    if one_task:
        ref = _join_in_one_task.remote(listing.units.to_arrow_refs(), notes.to_arrow_refs(), fmt, only_noted)
        units = ray.data.from_arrow_refs([ref])
    else:
        grouped = (
            notes.select_columns(NOTE_SCHEMA.names)
            .map_batches(_with_unit, fn_kwargs={"fmt": fmt}, batch_format="pyarrow")
            .groupby("unit", num_partitions=partitions)
            .map_groups(_group_of_unit, fn_kwargs={"fmt": fmt}, batch_format="pyarrow")
        )
        joined = listing.units.join(grouped, "inner" if only_noted else "left_outer", num_partitions=partitions, on=("path",))
        units = joined.map_batches(_still_to_read, batch_format="pyarrow")
    units = units.materialize()
    return Listing(fmt, units, units.count())
