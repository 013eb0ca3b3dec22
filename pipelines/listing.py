"""Listing a corpus in Ray tasks: no list of the corpus's files or sources in the driver.

The driver only checks that the input exists (`check_input`, one call, before Ray starts). `list_sources` then:
1. one task lists the input's top level: its files, and its directories;
2. one task per top-level directory walks it (`fs.walk`: a directory's listing at a time), pairing same-stem caption
   files with their images inside each directory;
3. the corpus format (auto: any .parquet -> parquet, else any .tar -> webdataset, else a folder) from a sum over
   the listed files;
4. the *units of work* (UNIT_SCHEMA: one image file; one parquet row group, read from the file's footer in the task;
   one tar file) as a materialized Dataset in the object store, which the scan and the main pass both read.
The largest thing one task holds is one directory's listing (or, for a flat layout, the input's top level): keep
corpora of millions of files in sub-directories or container files (img2dataset writes both).

Order is not global (no sorted list anywhere): every "first kept" rule downstream is decided inside its group by
the smallest URI, so nothing depends on the order units are listed in.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import ray

from pipelines.config import SourceConfig
from restoration.errors import InputError
from runtime.config import StorageConfig
from runtime.storage import filesystem, full_uri, is_storage_error, retrying

# One row per unit of work; every column present in every row (null where the kind has none), so blocks of any
# kind concatenate and join.
UNIT_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # file | row_group | tar | unreadable
        ("path", pa.string()),  # the file's URI
        ("caption_path", pa.string()),  # file: its same-stem caption file, or null
        ("row_group", pa.int64()),  # row_group: its index in the file ...
        ("offset", pa.int64()),  # ... its first row's index in the file (sources are path#row=N) ...
        ("rows", pa.int64()),  # ... and its row count
        ("error", pa.string()),  # unreadable: the read_error every source of the file gets
    ]
)
FILE_SCHEMA = pa.schema([("path", pa.string()), ("caption_path", pa.string()), ("is_caption", pa.bool_())])


@dataclass
class Listing:
    """A listed corpus: its format, its units of work (materialized in the object store) and their count."""

    format: str
    units: ray.data.Dataset
    count: int


def check_input(uri: str, storage: StorageConfig) -> None:
    """Fail fast (InputError naming the URI) when the input does not exist or cannot be reached: one call."""
    fs, root = filesystem(uri, storage)
    try:
        exists = fs.exists(root)
    except Exception as err:  # s3fs/botocore raise many classes for credentials, buckets and endpoints
        raise InputError(f"cannot list input {uri}: {type(err).__name__}: {err}") from err
    if not exists:
        raise InputError(f"input {uri} does not exist")


def list_sources(uri: str, config: SourceConfig, storage: StorageConfig) -> Listing:
    """The corpus's units of work, listed in Ray tasks (Ray must be initialised). InputError when it cannot be listed."""
    check_input(uri, storage)
    fs, root = filesystem(uri, storage)
    if _is_file(fs, root, uri, storage):
        files = ray.data.from_arrow(
            pa.Table.from_pylist([{"path": full_uri(fs, root), "caption_path": None, "is_caption": False}], FILE_SCHEMA)
        )
    else:
        top = ray.data.from_items([{"uri": uri}]).flat_map(_top_level, fn_kwargs={"storage": storage, "config": config}).materialize()
        directories = top.filter(expr="is_directory")
        count = directories.count()
        walked = (
            directories.repartition(max(1, count))
            .flat_map(_walk, fn_kwargs={"storage": storage, "config": config})
            .select_columns(FILE_SCHEMA.names)
        )
        at_root = top.filter(expr="not is_directory").select_columns(FILE_SCHEMA.names)
        files = at_root.union(walked) if count else at_root
        files = files.materialize()
    fmt = config.format if config.format != "auto" else _detect_format(files)
    units = files.map_batches(_units, fn_kwargs={"fmt": fmt, "config": config, "storage": storage}, batch_format="pyarrow", batch_size=64)
    units = units.materialize()
    return Listing(fmt, units, units.count())


def _is_file(fs, root: str, uri: str, storage: StorageConfig) -> bool:
    return retrying(lambda: fs.isfile(root), uri, storage, "list")


def _file_rows(fs, directory_files: list[str], config: SourceConfig) -> list[dict]:
    """One directory's files as FILE_SCHEMA rows: each image names its same-stem caption (the first by name)."""
    caption_ext = tuple(config.caption_extensions)
    by_stem: dict[str, list[str]] = {}
    for path in directory_files:
        if not posixpath.basename(path).startswith("."):
            by_stem.setdefault(posixpath.splitext(path)[0], []).append(path)
    rows = []
    for paths in by_stem.values():
        captions = sorted(p for p in paths if p.lower().endswith(caption_ext))
        caption = full_uri(fs, captions[0]) if captions else None
        for path in paths:
            is_caption = path.lower().endswith(caption_ext)
            rows.append({"path": full_uri(fs, path), "caption_path": None if is_caption else caption, "is_caption": is_caption})
    return rows


def _listing_error(uri: str, err: Exception) -> Exception:
    if is_storage_error(err, uri) or isinstance(err, InputError):
        return err
    return InputError(f"cannot list input {uri}: {type(err).__name__}: {err}")


def _top_level(row: dict, storage: StorageConfig, config: SourceConfig) -> list[dict]:
    uri = row["uri"]
    fs, root = filesystem(uri, storage)
    try:
        entries = retrying(lambda: fs.ls(root, detail=True), uri, storage, "list")
    except Exception as err:
        raise _listing_error(uri, err) from None
    files = [entry["name"] for entry in entries if entry["type"] != "directory"]
    rows = [{**file, "is_directory": False} for file in _file_rows(fs, files, config)]
    rows += [
        {"path": full_uri(fs, entry["name"]), "caption_path": None, "is_caption": False, "is_directory": True}
        for entry in entries
        if entry["type"] == "directory" and not posixpath.basename(entry["name"].rstrip("/")).startswith(".")
    ]
    return rows


def _walk(row: dict, storage: StorageConfig, config: SourceConfig) -> Iterator[dict]:
    uri = row["path"]
    fs, root = filesystem(uri, storage)
    try:
        for directory, subdirectories, names in fs.walk(root):
            subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
            yield from _file_rows(fs, [posixpath.join(directory, name) for name in names], config)
    except Exception as err:
        raise _listing_error(uri, err) from None


def _detect_format(files: ray.data.Dataset) -> str:
    def flags(batch: pa.Table) -> pa.Table:
        paths = batch.column("path").to_pylist()
        return pa.table({"parquet": [int(p.endswith(".parquet")) for p in paths], "tar": [int(p.endswith(".tar")) for p in paths]})

    if files.count() == 0:
        return "folder"
    counts = files.map_batches(flags, batch_format="pyarrow").sum(["parquet", "tar"])
    return "parquet" if counts["sum(parquet)"] else "webdataset" if counts["sum(tar)"] else "folder"


def _unit(kind: str, path: str, **values) -> dict:
    return {"kind": kind, "path": path, **{name: values.get(name) for name in UNIT_SCHEMA.names[2:]}}


def _units(batch: pa.Table, fmt: str, config: SourceConfig, storage: StorageConfig) -> pa.Table:
    from pipelines.sources import CORRUPT_FILE_ERRORS

    units = []
    for path, caption_path, is_caption in zip(*(batch.column(name).to_pylist() for name in FILE_SCHEMA.names), strict=True):
        if fmt == "folder":
            if not is_caption:
                units.append(_unit("file", path, caption_path=caption_path))
        elif fmt == "webdataset":
            if path.endswith(".tar"):
                units.append(_unit("tar", path))
        elif path.endswith(".parquet"):
            fs, local = filesystem(path, storage)
            try:
                metadata = retrying(lambda local=local, fs=fs: _parquet_metadata(fs, local), path, storage, "list")
            except CORRUPT_FILE_ERRORS as err:  # a corrupt footer: the file's rows are unknown, so the file is one reject
                units.append(_unit("unreadable", path, error=f"read_error: {path} is not a readable parquet file: {err}"))
                continue
            offset = 0
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                units.append(_unit("row_group", path, row_group=group, offset=offset, rows=rows))
                offset += rows
    return pa.Table.from_pylist(units, schema=UNIT_SCHEMA)


def _parquet_metadata(fs, path: str):
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata
