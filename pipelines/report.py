"""`--report PATH`: an HTML page with HQ / LQ / mask examples and histograms of the recorded quality scores.

Nothing corpus-sized in this process: the examples are the first rows of the first shard files, the histograms are
streamed (each Ray task bins its block's scores into fixed edges from a first min/max pass; only the bin counts
come back), the reject list shows its first REJECTS_SHOWN rows beside the manifest's counts by reason.
Ray must be initialised."""

from __future__ import annotations

import base64
import html
import io
import json

import cv2
import numpy as np
import pyarrow as pa
from ray.data.aggregate import Max, Min, Sum

from pipelines.outputs import parquet_files, read_json, read_parquet, table_dataset
from restoration.images import decode_image, encode_png
from runtime.config import StorageConfig
from runtime.storage import filesystem

MANIFEST = "manifest.json"
SCORES = ("sharpness", "entropy", "jpeg_quality", "aesthetic", "clip_score")
BINS = 20
REJECTS_SHOWN = 200


def thumbnail_cell(data: bytes | None, size: int = 160, mask: bool = False) -> str:
    if data is None:
        return "<td>-</td>"
    if mask:
        ids = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        colours = np.array(
            [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240]] * 32,
            np.uint8,
        )
        image = colours[ids]
    else:
        image = decode_image(data)
    scale = size / max(image.shape[:2])
    image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    return f'<td><img src="data:image/png;base64,{base64.b64encode(encode_png(image)).decode()}"></td>'


def _scores(batch: pa.Table) -> pa.Table:
    """The recorded scores of a block of samples, one float column per score (NaN where not recorded)."""
    qualities = [json.loads(q) if q else {} for q in batch.column("quality").to_pylist()]
    return pa.table({score: [float(q[score]) if isinstance(q.get(score), int | float) else np.nan for q in qualities] for score in SCORES})


AGGREGATIONS = ((Sum, "n"), (Min, "min"), (Max, "max"))


def score_histograms(fs, root: str, output_uri: str, storage: StorageConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{score: (counts, edges)} over every sample, computed in Ray tasks: a min/max pass, then per-block bin counts."""
    found = table_dataset(fs, root, output_uri, "shards", ["quality"], storage)
    if found is None:
        return {}
    scores = found[0].map_batches(_scores, batch_format="pyarrow").materialize()

    def bounds(batch: pa.Table) -> pa.Table:
        columns = {}
        for score in SCORES:
            values = batch.column(score).to_numpy(zero_copy_only=False)
            values = values[~np.isnan(values)]
            columns[f"{score}_min"] = [float(values.min()) if len(values) else np.inf]
            columns[f"{score}_max"] = [float(values.max()) if len(values) else -np.inf]
            columns[f"{score}_n"] = [len(values)]
        return pa.table(columns)

    # One aggregation for every score's count and range (one Ray Data execution each would cost seconds apiece).
    per_block = scores.map_batches(bounds, batch_format="pyarrow", batch_size=None)
    aggregations = [kind(f"{score}_{part}", alias_name=f"{score}_{part}") for score in SCORES for kind, part in AGGREGATIONS]
    overall = per_block.aggregate(*aggregations)
    edges = {}
    for score in SCORES:
        if overall[f"{score}_n"]:
            low, high = overall[f"{score}_min"], overall[f"{score}_max"]
            edges[score] = np.linspace(low, high if high > low else low + 1.0, BINS + 1)

    def binned(batch: pa.Table) -> pa.Table:
        columns = {}
        for score, score_edges in edges.items():
            values = batch.column(score).to_numpy(zero_copy_only=False)
            columns[score] = [np.histogram(values[~np.isnan(values)], bins=score_edges)[0].tolist()]
        return pa.table(columns)

    totals = {score: np.zeros(BINS, np.int64) for score in edges}
    for batch in scores.map_batches(binned, batch_format="pyarrow", batch_size=None).iter_batches(batch_format="pyarrow"):
        for score in edges:
            for counts in batch.column(score).to_pylist():
                totals[score] += np.asarray(counts, np.int64)
    return {score: (totals[score], edges[score]) for score in edges}


def _histogram(counts: np.ndarray, edges: np.ndarray, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(3.2, 2.2), dpi=100)
    axis.stairs(counts, edges, fill=True, color="#4878a8")
    axis.set_title(f"{title} (n={int(counts.sum())})", fontsize=9)
    axis.tick_params(labelsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return f'<img alt="{html.escape(title)} histogram" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _first_rows(fs, files: list[str], columns: list[str], count: int, storage: StorageConfig) -> pa.Table | None:
    """The first `count` rows of the files in order, reading only as many files as that takes."""
    tables, rows = [], 0
    for path in files:
        if rows >= count:
            break
        table = read_parquet(fs, path, storage, columns)
        tables.append(table)
        rows += table.num_rows
    return pa.concat_tables(tables).slice(0, count) if tables else None


def write_report(output_uri: str, report_path: str, storage: StorageConfig | None = None, examples: int = 12) -> None:
    storage = storage or StorageConfig()
    fs, root = filesystem(output_uri, storage)
    manifest = read_json(fs, f"{root}/{MANIFEST}", storage) or {}
    shard_files = parquet_files(fs, root, "shards")
    columns = ["source", "kind", "hq", "lq", "mask", "restoration_prompt", "caption"]
    shards = _first_rows(fs, shard_files, columns, examples, storage)
    reject_files = parquet_files(fs, root, "rejects")
    rejects = (
        pa.concat_tables([read_parquet(fs, path, storage) for path in reject_files[:REJECTS_SHOWN]]).slice(0, REJECTS_SHOWN)
        if reject_files
        else None
    )
    parts = [
        "<!doctype html><meta charset='utf-8'><title>restoray dataset report</title>",
        "<style>body{font-family:sans-serif;margin:2em}td{vertical-align:top;padding:4px;font-size:12px}img{display:block}</style>",
        f"<h1>Dataset report: {html.escape(output_uri)}</h1>",
        "<p>"
        + ", ".join(
            f"{k}: {html.escape(str(manifest.get(k)))}" for k in ("sources_in", "sources_accepted", "sources_rejected", "samples_written")
        )
        + "</p>",
    ]
    if shards is not None and shards.num_rows:
        parts.append("<h2>Examples</h2><table><tr><th>HQ</th><th>LQ</th><th>mask</th><th>sample</th></tr>")
        rows = shards.to_pylist()
        for row in rows:
            prompt = html.escape(row["restoration_prompt"] or "(no restoration prompt)")
            caption = html.escape((row["caption"] or "")[:200])
            description = f"<b>{html.escape(row['kind'])}</b><br>{prompt}<br><i>{caption}</i><br>{html.escape(row['source'])}"
            cells = thumbnail_cell(row["hq"]) + thumbnail_cell(row["lq"]) + thumbnail_cell(row["mask"], mask=True)
            parts.append(f"<tr>{cells}<td>{description}</td></tr>")
        parts.append("</table><h2>Quality scores of accepted images</h2>")
        for score, (counts, edges) in score_histograms(fs, root, output_uri, storage).items():
            parts.append(_histogram(counts, edges, score))
    if rejects is not None and rejects.num_rows:
        by_reason = ", ".join(f"{reason} {count}" for reason, count in sorted((manifest.get("rejected_by_reason") or {}).items()))
        parts.append(f"<h2>Rejected sources</h2><p>{html.escape(by_reason)}; the first {rejects.num_rows} shown</p>")
        parts.append("<table><tr><th>source</th><th>stage</th><th>reason</th><th>detail</th></tr>")
        for row in rejects.to_pylist():
            parts.append(
                "<tr>" + "".join(f"<td>{html.escape(str(row[k]))}</td>" for k in ("source", "stage", "reason", "detail")) + "</tr>"
            )
        parts.append("</table>")
    with open(report_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))
