"""The dataset contract, in one place: the parquet schema of the shards `restoray data build` writes and training
reads, and of the rejects table (docs/architecture.md, "Dataset layout")."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # stable hash of source bytes + source + variant
        ("source", pa.string()),  # URI of the source sample
        ("caption", pa.string()),  # used for training
        ("alt_text", pa.string()),  # the caption as found
        ("hq", pa.binary()),  # PNG/JPEG bytes, RGB
        ("lq", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("kind", pa.string()),  # restoration.degradations.sample.KINDS
        ("degradation", pa.string()),  # JSON: ordered ops with parameters
        ("restoration_prompt", pa.string()),
        ("mask", pa.binary()),  # PNG of per-pixel degradation ids (composite, single), else null
        ("quality", pa.string()),  # JSON of scores
    ]
)
SAMPLE_COLUMNS = tuple(SAMPLE_SCHEMA.names)
REJECT_SCHEMA = pa.schema([("source", pa.string()), ("stage", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
# Why a source was rejected: a closed list (docs/architecture.md); a new code is added there and here first.
REASONS = (
    "read_error",
    "empty",
    "truncated",
    "not_image",
    "too_large",
    "too_small",
    "aspect_ratio",
    "blurry",
    "low_jpeg_quality",
    "flat",
    "low_aesthetic",
    "low_clip_score",
    "duplicate",
    "near_duplicate",
    "clip_duplicate",
    "caption_error",
    "restore_error",
)
# CLIP image embeddings, one row per source: `data build`'s embeddings/ and `index build`'s embeddings/.
EMBEDDING_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # source_id(source)
        ("source", pa.string()),
        ("embedding", pa.binary()),  # L2-normalised float32, little-endian (the preset's open-clip width)
    ]
)


def source_id(source: str) -> str:
    """The stable id of a source URI (embeddings and the reference store key by it)."""
    return hashlib.sha256(source.encode()).hexdigest()[:32]


def one_row_per_id(table: pa.Table) -> pa.Table:
    """An embeddings table sorted by id with one row per id (a source written twice by a resumed run counts once):
    row i is position i of the index built from it."""
    table = table.sort_by("id")
    ids = table.column("id")
    if len(ids) < 2:
        return table
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1)).combine_chunks()
    return table.filter(pa.concat_arrays([pa.array([True]), first]))


def embedding_matrix(column) -> np.ndarray:
    """An embeddings table's `embedding` column (bytes per row) as an (N, dim) float32 array."""
    values = column.to_pylist() if hasattr(column, "to_pylist") else list(column)
    if not values:
        return np.zeros((0, 0), np.float32)
    return np.frombuffer(b"".join(values), dtype="<f4").reshape(len(values), -1)


# What training reads of a sample.
TRAINING_COLUMNS = ("id", "caption", "hq", "lq", "kind", "degradation", "restoration_prompt", "mask")
