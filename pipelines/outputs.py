"""A job's output directory: its JSON manifests and its parquet tables (shards/, rejects/, embeddings/, results/),
read by the driver only a file or a small column at a time, or as Ray Datasets (`table_dataset`) for the global
passes. Shared by every job of `pipelines/`."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from restoration.errors import InputError
from runtime.config import StorageConfig
from runtime.storage import arrow_filesystem, full_uri, retrying


def read_json(fs, path: str, storage: StorageConfig) -> dict | None:
    """The JSON file's content; None only when the file does not exist. A corrupt file is an error naming it."""

    def read() -> bytes | None:
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as handle:
            return handle.read()

    payload = retrying(read, path, storage)
    if payload is None:
        return None
    try:
        value = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is corrupt ({err}); remove it (or the whole output) to build afresh") from None
    if not isinstance(value, dict):
        raise InputError(f"{path} is corrupt (not a JSON object); remove it (or the whole output) to build afresh")
    return value


def write_json(fs, path: str, payload: dict) -> None:
    partial = f"{path}.partial"
    with fs.open(partial, "wb") as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=True).encode())
    fs.mv(partial, path)


def parquet_files(fs, root: str, name: str) -> list[str]:
    """The committed parquet files of one output table (their names: one per written part, not per row)."""
    directory = f"{root}/{name}"
    # Write tasks add files behind this process's back; s3fs would answer from the listing it cached earlier.
    fs.invalidate_cache(directory)
    if not fs.exists(directory):
        return []
    return sorted(p for p in fs.find(directory) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("."))


def read_parquet(fs, path: str, storage: StorageConfig, columns: list[str] | None = None) -> pa.Table:
    def read() -> pa.Table:
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)

    try:
        return retrying(read, path, storage)
    except (pa.ArrowInvalid, EOFError) as err:
        raise InputError(f"{path} is corrupt ({err}); remove it to rebuild what it held") from None


def table_dataset(
    fs, root: str, output_uri: str, name: str, columns: list[str], storage: StorageConfig
) -> tuple[ray.data.Dataset, int] | None:
    """One output table as a Ray Dataset of `columns` and its row count (from the files' footers), or None when the
    table has no file yet: read in Ray tasks, never gathered here."""
    files = parquet_files(fs, root, name)
    if not files:
        return None
    pafs, _ = arrow_filesystem(output_uri, storage)
    dataset = ray.data.read_parquet([p if pafs is not None else full_uri(fs, p) for p in files], filesystem=pafs, columns=columns)
    return dataset, dataset.count()
