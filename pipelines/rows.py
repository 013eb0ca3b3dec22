"""Rows as they move between the dataset-build stages, and the helpers every stage uses.

Stages see batches as dicts of columns (Ray Data's "numpy" format) and work on them row by row as plain dicts.
A rejected row keeps flowing with `reject_stage`/`reject_reason`/`reject_detail` set; later stages pass it
through untouched and the sink writes it to the rejects table. That is how every source ends in exactly one
place. Decoded pixels travel as raw bytes with their height and width (Arrow handles nulls in a binary column;
a variable-shaped tensor column does not take them).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipelines.timer import report
from restoration.dataset import REASONS

# Columns between the read and degrade stages.
WORK_COLUMNS = (
    "source",
    "data",
    "caption",
    "alt_text",
    "error",
    "pixels",
    "height",
    "width",
    "quality",
    "embedding",
    "reject_stage",
    "reject_reason",
    "reject_detail",
)


def rows_of(batch: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(batch)
    count = len(batch[keys[0]]) if keys else 0
    return [{key: _plain(batch[key][index]) for key in keys} for index in range(count)]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    # A column that was all nulls in some block comes back from Arrow as float NaN; no work column holds floats.
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def batch_of(rows: list[dict[str, Any]], columns: tuple[str, ...] = WORK_COLUMNS) -> dict[str, np.ndarray]:
    batch = {}
    for column in columns:
        values = np.empty(len(rows), dtype=object)
        values[:] = [row.get(column) for row in rows]
        batch[column] = values
    return batch


def is_rejected(row: dict) -> bool:
    return row.get("reject_reason") is not None


def reject(row: dict, stage: str, reason: str, detail: str) -> dict:
    if reason not in REASONS:
        raise ValueError(f"unknown reject reason {reason!r}; add it to docs/architecture.md's list and restoration/dataset.py first")
    row.update(reject_stage=stage, reject_reason=reason, reject_detail=detail, pixels=None, data=None, embedding=None)
    return row


def image_of(row: dict) -> np.ndarray:
    return np.frombuffer(row["pixels"], np.uint8).reshape(int(row["height"]), int(row["width"]), 3)


def set_image(row: dict, image: np.ndarray) -> None:
    image = np.ascontiguousarray(image, dtype=np.uint8)
    row.update(pixels=image.tobytes(), height=int(image.shape[0]), width=int(image.shape[1]))


def quality_of(row: dict) -> dict:
    return json.loads(row["quality"]) if row.get("quality") else {}


def set_quality(row: dict, **scores: Any) -> None:
    quality = quality_of(row)
    quality.update(scores)
    row["quality"] = json.dumps(quality, sort_keys=True)


def run_on_live(
    stage: str, batch: dict, process: Callable[[list[dict]], None], timer=None, wanted: Callable[[dict], bool] = lambda row: True
) -> dict:
    """The body of every stage UDF: `process` the rows not rejected yet (in place, as a list, so model stages can
    batch them), pass the others through, and report the busy time to `timer`."""
    started = time.perf_counter()
    rows = rows_of(batch)
    live = [row for row in rows if not is_rejected(row) and wanted(row)]
    if live:
        process(live)
    if timer is not None:
        report(timer, stage, len(rows), time.perf_counter() - started)
    return batch_of(rows, tuple(batch))


def row_stage(stage: str, function: Callable[[dict], dict], timer=None) -> Callable[[dict], dict]:
    """Batch UDF applying `function` (which updates a row in place) to every row that is not rejected yet."""

    def udf(batch: dict) -> dict:
        return run_on_live(stage, batch, lambda live: [function(row) for row in live], timer)

    udf.__name__ = stage
    return udf


def concat_blocks(blocks, schema):
    """Ray Data blocks (pyarrow tables) as one table of `schema`'s columns: empty blocks (which may carry no columns)
    are skipped, an empty table of `schema` when none has rows."""
    import pyarrow as pa

    tables = [block.select(schema.names).cast(schema) for block in blocks if block.num_rows]
    return pa.concat_tables(tables) if tables else schema.empty_table()
