"""The dataset contract, in one place: the parquet schema of the shards `restoray data build` writes and training
reads, and of the rejects table (docs/architecture.md, "Dataset layout")."""

from __future__ import annotations

import pyarrow as pa

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
    "caption_error",
)
# What training reads of a sample.
TRAINING_COLUMNS = ("id", "caption", "hq", "lq", "kind", "degradation", "restoration_prompt", "mask")
