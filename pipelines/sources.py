"""Corpus readers: an image folder, img2dataset-style parquet, or webdataset tars; local paths or s3://.

Units of work (one file; one parquet row group; one tar file) are listed in Ray tasks (pipelines/listing.py); Ray
tasks read each unit and stream rows out in small batches, so memory stays bounded whatever the corpus size.

Every row: `source` (a stable URI naming the sample: the file path, `file.parquet#row=N`, `shard.tar#key`),
`data` (image bytes, or null), `caption` (text or null), `error` (why the row cannot be read, or null).

Errors of one source (not found, a corrupt tar or parquet file) become that source's `read_error` row; errors of
the storage (403, throttling, timeouts, 5xx, resets) are retried with backoff and, if they persist, raise
`StorageError` and stop the build (runtime/storage.py): they are never written as rejects, so resume reads them again.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator

import fsspec
import pyarrow as pa

from pipelines.config import SourceConfig
from pipelines.known_sources import KEEP, STORED
from restoration.errors import InputError
from runtime.config import StorageConfig
from runtime.storage import Backoff, StorageError, filesystem, is_storage_error, read_bytes, retrying

log = logging.getLogger(__name__)
ROWS_PER_BATCH = 16
# What a corrupt container file raises (pyarrow's ArrowInvalid is a ValueError; a cut tar raises EOFError).
CORRUPT_FILE_ERRORS = (tarfile.TarError, pa.ArrowInvalid, EOFError, ValueError)


def read_units(batch: pa.Table, config: SourceConfig, storage: StorageConfig, only_noted: bool = False) -> Iterator[dict]:
    """Ray Data UDF (pyarrow batches of pipelines.listing.UNIT_SCHEMA, with `known`): units of work in, batches of
    source rows out (a generator, so rows stream). A unit's notes (pipelines/known_sources.py) are applied while
    reading: finished sources are skipped and decided ones rejected, both without reading their bytes; with
    `only_noted`, so is every source without a note (an index of a dataset's accepted sources)."""
    rows: list[dict] = []
    for unit in batch.to_pylist():
        notes = {note["source"]: note for note in unit.get("known") or ()}
        for row in _read_unit(unit, config, storage, _Plan(notes, only_noted)):
            rows.append(row)
            if len(rows) >= ROWS_PER_BATCH:
                yield _to_batch(rows)
                rows = []
    if rows:
        yield _to_batch(rows)


ROW_COLUMNS = ("source", "data", "caption", "error", "embedding", "reject_stage", "reject_reason", "reject_detail")


def _to_batch(rows: list[dict]) -> dict:
    return {key: [row.get(key) for row in rows] for key in ROW_COLUMNS}


def _row(source: str, data: bytes | None, caption: str | None, error: str | None) -> dict:
    return {"source": source, "data": data, "caption": caption, "error": error}


class _Plan:
    """What a unit's notes say about each of its sources."""

    def __init__(self, notes: dict[str, dict], only: bool):
        self.notes, self.only = notes, only

    def skipped(self, source: str) -> bool:
        note = self.notes.get(source)
        return (note is not None and note["reason"] is None) or (self.only and note is None)

    def decided(self, source: str) -> dict | None:
        """A reject row for a source decided without reading, else None."""
        note = self.notes.get(source)
        if note is None or note["reason"] in (None, KEEP, STORED):
            return None
        return {**_row(source, None, None, None), "reject_stage": "dedup", "reject_reason": note["reason"], "reject_detail": note["detail"]}

    def finish(self, row: dict) -> dict:
        note = self.notes.get(row["source"])
        if note is not None and note.get("embedding") is not None:
            row["embedding"] = note["embedding"]
        return row


def _read_unit(unit: dict, config: SourceConfig, storage: StorageConfig, plan: _Plan) -> Iterator[dict]:
    if unit["kind"] == "file":
        if plan.skipped(unit["path"]):
            return
        decided = plan.decided(unit["path"])
        yield decided if decided is not None else plan.finish(_read_file(unit, storage))
    elif unit["kind"] == "row_group":
        yield from _read_row_group(unit, config, storage, plan)
    elif unit["kind"] == "tar":
        yield from _read_tar(unit, config, storage, plan)
    elif not plan.skipped(unit["path"]):  # "unreadable": found corrupt while listing
        yield _row(unit["path"], None, None, unit["error"])


def _read_bytes(uri: str, storage: StorageConfig) -> tuple[bytes | None, str | None]:
    """(bytes, None), or (None, a read_error) for an error of this source. Storage errors raise StorageError."""
    try:
        return read_bytes(uri, storage), None
    except StorageError:
        raise
    except Exception as err:
        return None, f"read_error: cannot read {uri}: {type(err).__name__}: {err}"


def _caption_text(payload: bytes, name: str) -> tuple[str | None, str | None]:
    """(caption, error). JSON captions take the 'caption' (or 'text') key."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"caption_error: {name} is not UTF-8 ({err})"
    if name.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            return None, f"caption_error: {name} is not valid JSON ({err})"
        value = data.get("caption", data.get("text")) if isinstance(data, dict) else None
        return (str(value) if value is not None else None), None
    return text.strip(), None


def _read_file(unit: dict, storage: StorageConfig) -> dict:
    data, error = _read_bytes(unit["path"], storage)
    caption = None
    if unit["caption_path"] and error is None:
        payload, caption_read_error = _read_bytes(unit["caption_path"], storage)
        if caption_read_error:
            error = caption_read_error.replace("read_error", "caption_error", 1)
        else:
            caption, error = _caption_text(payload, unit["caption_path"])
    return _row(unit["path"], data, caption, error)


def _read_row_group(unit: dict, config: SourceConfig, storage: StorageConfig, plan: _Plan) -> Iterator[dict]:
    import pyarrow.parquet as pq

    fs, path = filesystem(unit["path"], storage)

    def read() -> tuple[list[str], pa.Table]:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            if config.image_column not in names:
                raise InputError(
                    f"{unit['path']}: no image column {config.image_column!r}; columns: {', '.join(names)} (set data.source.image_column)"
                )
            columns = [config.image_column] + ([config.caption_column] if config.caption_column in names else [])
            return names, parquet.read_row_group(unit["row_group"], columns=columns)

    try:
        names, table = retrying(read, unit["path"], storage)
    except (InputError, StorageError):
        raise
    except (*CORRUPT_FILE_ERRORS, OSError) as err:  # a corrupt row group: each of its rows is a reject
        for index in range(unit["rows"]):
            source = f"{unit['path']}#row={unit['offset'] + index}"
            if not plan.skipped(source):
                yield _row(source, None, None, f"read_error: corrupt row group {unit['row_group']}: {err}")
        return
    images = table.column(config.image_column).to_pylist()
    captions = table.column(config.caption_column).to_pylist() if config.caption_column in names else [None] * len(images)
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        source = f"{unit['path']}#row={unit['offset'] + index}"
        if plan.skipped(source):
            continue
        if (decided := plan.decided(source)) is not None:
            yield decided
            continue
        caption = caption if caption is None else str(caption)
        if isinstance(image, str):  # a path or URI to read
            if "://" in image and not image.startswith("s3://"):
                yield _row(source, None, caption, f"read_error: unsupported image URI {image!r}")
                continue
            data, error = _read_bytes(image, storage)
            yield plan.finish(_row(source, data, caption, error))
        else:
            yield plan.finish(_row(source, image, caption, None))


def _read_tar(unit: dict, config: SourceConfig, storage: StorageConfig, plan: _Plan) -> Iterator[dict]:
    """Group members by key (the basename up to its first dot) ourselves: tars need not be ordered by key.

    A storage error part-way through re-opens the tar (with backoff) and skips the keys already yielded; a corrupt
    tar yields one reject for the rest of the file (or for the file, when nothing of it could be read)."""
    uri = unit["path"]
    fs, path = filesystem(uri, storage)
    yielded: set[str] = set()
    backoff = Backoff(uri, storage)
    while True:
        try:
            for key, row in _tar_rows(fs, path, uri, config, plan):
                if key not in yielded:
                    yielded.add(key)
                    yield row
            return
        except CORRUPT_FILE_ERRORS as err:
            if not plan.skipped(uri):
                yield _row(uri, None, None, f"read_error: {uri} is not a readable tar: {err}")
            return
        except Exception as err:
            if not is_storage_error(err, uri):
                if not plan.skipped(uri):
                    yield _row(uri, None, None, f"read_error: {uri} is not a readable tar: {type(err).__name__}: {err}")
                return
            backoff.failed(err)  # sleeps, or raises StorageError once the attempts are spent


def _tar_rows(fs: fsspec.AbstractFileSystem, path: str, uri: str, config: SourceConfig, plan: _Plan) -> Iterator[tuple[str, dict | None]]:
    image_ext = tuple(config.image_extensions)
    caption_ext = tuple(config.caption_extensions)
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in tar.getmembers():
            if not member.isfile():
                continue
            directory, base = posixpath.split(member.name)
            key, dot, extension = base.partition(".")
            groups.setdefault(posixpath.join(directory, key), {})["." + extension.lower() if dot else ""] = member
        for key in sorted(groups):
            members = groups[key]
            source = f"{uri}#{key}"
            if plan.skipped(source):
                continue
            if (decided := plan.decided(source)) is not None:
                yield key, decided
                continue
            image_member = next((members[e] for e in members if e.endswith(image_ext)), None)
            caption_member = next((members[e] for e in sorted(members) if e.endswith(caption_ext)), None)
            caption, error = None, None
            if caption_member is not None:
                caption, error = _caption_text(tar.extractfile(caption_member).read(), caption_member.name)
            if image_member is None:
                yield key, _row(source, None, caption, f"not_image: no member with an image extension ({', '.join(sorted(members))})")
                continue
            yield key, plan.finish(_row(source, tar.extractfile(image_member).read(), caption, error))
