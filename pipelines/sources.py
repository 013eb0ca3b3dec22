"""Corpus readers: an image folder, img2dataset-style parquet, or webdataset tars; local paths or s3://.

The driver lists only *units of work* (file names; parquet row groups; tar files), never image bytes; Ray tasks
read each unit and stream rows out in small batches, so memory stays bounded whatever the corpus size.

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
from pipelines.rows import rows_of
from restoration.errors import InputError
from runtime.config import StorageConfig
from runtime.storage import Backoff, StorageError, filesystem, full_uri, is_storage_error, read_bytes, retrying

log = logging.getLogger(__name__)
ROWS_PER_BATCH = 16
# What a corrupt container file raises (pyarrow's ArrowInvalid is a ValueError; a cut tar raises EOFError).
CORRUPT_FILE_ERRORS = (tarfile.TarError, pa.ArrowInvalid, EOFError, ValueError)


def detect_format(fs: fsspec.AbstractFileSystem, root: str, config: SourceConfig) -> str:
    if config.format != "auto":
        return config.format
    if fs.isfile(root):
        return "parquet" if root.endswith(".parquet") else "webdataset" if root.endswith(".tar") else "folder"
    for path in fs.find(root):
        if path.endswith(".parquet"):
            return "parquet"
        if path.endswith(".tar"):
            return "webdataset"
    return "folder"


def list_units(uri: str, config: SourceConfig, storage: StorageConfig) -> tuple[str, list[dict]]:
    """The corpus format and its units of work. Raises `InputError` naming the URI when it cannot be listed."""
    fs, root = filesystem(uri, storage)
    try:
        if not fs.exists(root):
            raise InputError(f"input {uri} does not exist")
        fmt = detect_format(fs, root, config)
        files = [root] if fs.isfile(root) else sorted(fs.find(root))
        return fmt, _units(fs, fmt, files, config, storage)
    except InputError:
        raise
    except Exception as err:  # s3fs/botocore raise many classes for credentials, buckets and endpoints
        raise InputError(f"cannot list input {uri}: {type(err).__name__}: {err}") from err


def _units(fs: fsspec.AbstractFileSystem, fmt: str, files: list[str], config: SourceConfig, storage: StorageConfig) -> list[dict]:
    if fmt == "folder":
        caption_ext = tuple(config.caption_extensions)
        by_stem: dict[str, list[str]] = {}
        for path in files:
            if posixpath.basename(path).startswith("."):
                continue
            by_stem.setdefault(posixpath.splitext(path)[0], []).append(path)
        units = []
        for _stem, paths in sorted(by_stem.items()):
            captions = sorted(p for p in paths if p.lower().endswith(caption_ext))
            for image in sorted(p for p in paths if not p.lower().endswith(caption_ext)):
                units.append({"kind": "file", "path": full_uri(fs, image), "caption_path": full_uri(fs, captions[0]) if captions else None})
        return units
    if fmt == "parquet":
        units = []
        for path in (p for p in files if p.endswith(".parquet")):
            uri = full_uri(fs, path)
            try:
                metadata = retrying(lambda path=path: _parquet_metadata(fs, path), uri, storage, "list")
            except CORRUPT_FILE_ERRORS as err:  # a corrupt footer: the file's rows are unknown, so the file is one reject
                units.append({"kind": "unreadable", "path": uri, "error": f"read_error: {uri} is not a readable parquet file: {err}"})
                continue
            offset = 0
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                units.append({"kind": "row_group", "path": uri, "row_group": group, "offset": offset, "rows": rows})
                offset += rows
        return units
    return [{"kind": "tar", "path": full_uri(fs, p)} for p in files if p.endswith(".tar")]


def _parquet_metadata(fs: fsspec.AbstractFileSystem, path: str):
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata


def read_units(batch: dict, config: SourceConfig, storage: StorageConfig) -> Iterator[dict]:
    """Ray Data UDF: units of work in, batches of source rows out (a generator, so rows stream)."""
    rows: list[dict] = []
    for unit in rows_of(batch):
        for row in _read_unit(unit, config, storage):
            rows.append(row)
            if len(rows) >= ROWS_PER_BATCH:
                yield _to_batch(rows)
                rows = []
    if rows:
        yield _to_batch(rows)


def _to_batch(rows: list[dict]) -> dict:
    return {key: [row[key] for row in rows] for key in ("source", "data", "caption", "error")}


def _row(source: str, data: bytes | None, caption: str | None, error: str | None) -> dict:
    return {"source": source, "data": data, "caption": caption, "error": error}


def _read_unit(unit: dict, config: SourceConfig, storage: StorageConfig) -> Iterator[dict]:
    if unit["kind"] == "file":
        yield _read_file(unit, storage)
    elif unit["kind"] == "row_group":
        yield from _read_row_group(unit, config, storage)
    elif unit["kind"] == "tar":
        yield from _read_tar(unit, config, storage)
    else:  # "unreadable": found corrupt while listing
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


def _read_row_group(unit: dict, config: SourceConfig, storage: StorageConfig) -> Iterator[dict]:
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
            yield _row(
                f"{unit['path']}#row={unit['offset'] + index}", None, None, f"read_error: corrupt row group {unit['row_group']}: {err}"
            )
        return
    images = table.column(config.image_column).to_pylist()
    captions = table.column(config.caption_column).to_pylist() if config.caption_column in names else [None] * len(images)
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        source = f"{unit['path']}#row={unit['offset'] + index}"
        caption = caption if caption is None else str(caption)
        if isinstance(image, str):  # a path or URI to read
            if "://" in image and not image.startswith("s3://"):
                yield _row(source, None, caption, f"read_error: unsupported image URI {image!r}")
                continue
            data, error = _read_bytes(image, storage)
            yield _row(source, data, caption, error)
        else:
            yield _row(source, image, caption, None)


def _read_tar(unit: dict, config: SourceConfig, storage: StorageConfig) -> Iterator[dict]:
    """Group members by key (the basename up to its first dot) ourselves: tars need not be ordered by key.

    A storage error part-way through re-opens the tar (with backoff) and skips the keys already yielded; a corrupt
    tar yields one reject for the rest of the file (or for the file, when nothing of it could be read)."""
    uri = unit["path"]
    fs, path = filesystem(uri, storage)
    yielded: set[str] = set()
    backoff = Backoff(uri, storage)
    while True:
        try:
            for key, row in _tar_rows(fs, path, uri, config):
                if key not in yielded:
                    yielded.add(key)
                    yield row
            return
        except CORRUPT_FILE_ERRORS as err:
            yield _row(uri, None, None, f"read_error: {uri} is not a readable tar: {err}")
            return
        except Exception as err:
            if not is_storage_error(err, uri):
                yield _row(uri, None, None, f"read_error: {uri} is not a readable tar: {type(err).__name__}: {err}")
                return
            backoff.failed(err)  # sleeps, or raises StorageError once the attempts are spent


def _tar_rows(fs: fsspec.AbstractFileSystem, path: str, uri: str, config: SourceConfig) -> Iterator[tuple[str, dict]]:
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
            image_member = next((members[e] for e in members if e.endswith(image_ext)), None)
            caption_member = next((members[e] for e in sorted(members) if e.endswith(caption_ext)), None)
            caption, error = None, None
            if caption_member is not None:
                caption, error = _caption_text(tar.extractfile(caption_member).read(), caption_member.name)
            if image_member is None:
                yield key, _row(source, None, caption, f"not_image: no member with an image extension ({', '.join(sorted(members))})")
                continue
            yield key, _row(source, tar.extractfile(image_member).read(), caption, error)
