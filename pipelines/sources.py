"""Corpus readers: an image folder, img2dataset-style parquet, or webdataset tars; local paths or s3://.

The driver lists only *units of work* (file names; parquet row groups; tar files), never image bytes; Ray tasks
read each unit and stream rows out in small batches, so memory stays bounded whatever the corpus size.

Every row: `source` (a stable URI naming the sample: the file path, `file.parquet#row=N`, `shard.tar#key`),
`data` (image bytes, or null), `caption` (text or null), `error` (why the row cannot be read, or null).
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec

from pipelines.config import SourceConfig
from pipelines.rows import rows_of
from restoration.errors import InputError

log = logging.getLogger(__name__)
ROWS_PER_BATCH = 16


def filesystem(uri: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for a local path or s3:// URI."""
    if uri.startswith("s3://"):
        return fsspec.filesystem("s3", **storage_options), uri.removeprefix("s3://")
    if "://" in uri:
        raise InputError(f"unsupported input URI {uri!r}; use a local path or s3://")
    return fsspec.filesystem("file"), uri


def _full(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return f"s3://{path}" if "s3" in fs.protocol else path


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


def list_units(uri: str, config: SourceConfig, storage_options: dict[str, Any]) -> tuple[str, list[dict]]:
    """The corpus format and its units of work. Raises `InputError` naming the URI when it cannot be listed."""
    fs, root = filesystem(uri, storage_options)
    try:
        if not fs.exists(root):
            raise InputError(f"input {uri} does not exist")
        fmt = detect_format(fs, root, config)
        files = [root] if fs.isfile(root) else sorted(fs.find(root))
    except InputError:
        raise
    except Exception as err:  # s3fs/botocore raise many classes for credentials, buckets and endpoints
        raise InputError(f"cannot list input {uri}: {type(err).__name__}: {err}") from err
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
                units.append({"kind": "file", "path": _full(fs, image), "caption_path": _full(fs, captions[0]) if captions else None})
        return fmt, units
    if fmt == "parquet":
        import pyarrow.parquet as pq

        units = []
        for path in (p for p in files if p.endswith(".parquet")):
            with fs.open(path, "rb") as handle:
                metadata = pq.ParquetFile(handle).metadata
            offset = 0
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                units.append({"kind": "row_group", "path": _full(fs, path), "row_group": group, "offset": offset})
                offset += rows
        return fmt, units
    return fmt, [{"kind": "tar", "path": _full(fs, p)} for p in files if p.endswith(".tar")]


def read_units(batch: dict, config: SourceConfig, storage_options: dict[str, Any]) -> Iterator[dict]:
    """Ray Data UDF: units of work in, batches of source rows out (a generator, so rows stream)."""
    rows: list[dict] = []
    for unit in rows_of(batch):
        for row in _read_unit(unit, config, storage_options):
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


def _read_unit(unit: dict, config: SourceConfig, storage_options: dict[str, Any]) -> Iterator[dict]:
    fs, path = filesystem(unit["path"], storage_options)
    if unit["kind"] == "file":
        yield _read_file(fs, unit, config, storage_options)
    elif unit["kind"] == "row_group":
        yield from _read_row_group(fs, path, unit, config, storage_options)
    else:
        yield from _read_tar(fs, path, unit, config)


def _read_bytes(fs, path: str) -> tuple[bytes | None, str | None]:
    try:
        with fs.open(path, "rb") as handle:
            return handle.read(), None
    except Exception as err:
        return None, f"read_error: cannot read {path}: {type(err).__name__}: {err}"


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


def _read_file(fs, unit: dict, config: SourceConfig, storage_options: dict[str, Any]) -> dict:
    _, image_path = filesystem(unit["path"], storage_options)
    data, error = _read_bytes(fs, image_path)
    caption = None
    if unit["caption_path"] and error is None:
        _, caption_path = filesystem(unit["caption_path"], storage_options)
        payload, caption_read_error = _read_bytes(fs, caption_path)
        if caption_read_error:
            error = caption_read_error.replace("read_error", "caption_error", 1)
        else:
            caption, error = _caption_text(payload, caption_path)
    return _row(unit["path"], data, caption, error)


def _read_row_group(fs, path: str, unit: dict, config: SourceConfig, storage_options: dict[str, Any]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        if config.image_column not in names:
            raise InputError(
                f"{unit['path']}: no image column {config.image_column!r}; columns: {', '.join(names)} (set data.source.image_column)"
            )
        columns = [config.image_column] + ([config.caption_column] if config.caption_column in names else [])
        table = parquet.read_row_group(unit["row_group"], columns=columns)
    images = table.column(config.image_column).to_pylist()
    captions = table.column(config.caption_column).to_pylist() if config.caption_column in names else [None] * len(images)
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        source = f"{unit['path']}#row={unit['offset'] + index}"
        if isinstance(image, str):  # a path or URI to read
            image_fs, image_path = filesystem(image, storage_options) if "://" not in image or image.startswith("s3://") else (None, image)
            if image_fs is None:
                yield _row(source, None, caption, f"read_error: unsupported image URI {image!r}")
                continue
            data, error = _read_bytes(image_fs, image_path)
            yield _row(source, data, caption, error)
        else:
            yield _row(source, image, caption if caption is None else str(caption), None)


def _read_tar(fs, path: str, unit: dict, config: SourceConfig) -> Iterator[dict]:
    """Group members by key (the basename up to its first dot) ourselves: tars need not be ordered by key."""
    image_ext = tuple(config.image_extensions)
    caption_ext = tuple(config.caption_extensions)
    try:
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
                source = f"{unit['path']}#{key}"
                image_member = next((members[e] for e in members if e.endswith(image_ext)), None)
                caption_member = next((members[e] for e in sorted(members) if e.endswith(caption_ext)), None)
                caption, error = None, None
                if caption_member is not None:
                    caption, error = _caption_text(tar.extractfile(caption_member).read(), caption_member.name)
                if image_member is None:
                    yield _row(source, None, caption, f"not_image: no member with an image extension ({', '.join(sorted(members))})")
                    continue
                yield _row(source, tar.extractfile(image_member).read(), caption, error)
    except (tarfile.TarError, OSError) as err:
        yield _row(unit["path"], None, None, f"read_error: {unit['path']} is not a readable tar: {err}")
