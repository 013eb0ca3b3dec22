"""`--report PATH`: an HTML page with HQ / LQ / mask examples and histograms of the recorded quality scores."""

from __future__ import annotations

import base64
import html
import io
import json

import cv2
import numpy as np

from pipelines.build_dataset import MANIFEST, read_json, read_table
from restoration.images import decode_image, encode_png
from runtime.config import StorageConfig
from runtime.storage import filesystem

SCORES = ("sharpness", "entropy", "jpeg_quality", "aesthetic", "clip_score")


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


def _histogram(values: list[float], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(3.2, 2.2), dpi=100)
    axis.hist(values, bins=20, color="#4878a8")
    axis.set_title(f"{title} (n={len(values)})", fontsize=9)
    axis.tick_params(labelsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return f'<img alt="{html.escape(title)} histogram" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def write_report(output_uri: str, report_path: str, storage: StorageConfig | None = None, examples: int = 12) -> None:
    storage = storage or StorageConfig()
    fs, root = filesystem(output_uri, storage)
    manifest = read_json(fs, f"{root}/{MANIFEST}", storage) or {}
    shards = read_table(fs, root, "shards", ["source", "kind", "hq", "lq", "mask", "restoration_prompt", "caption", "quality"], storage)
    rejects = read_table(fs, root, "rejects", ["source", "stage", "reason", "detail"], storage)
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
        rows = shards.slice(0, examples).to_pylist()
        for row in rows:
            prompt = html.escape(row["restoration_prompt"] or "(no restoration prompt)")
            caption = html.escape((row["caption"] or "")[:200])
            description = f"<b>{html.escape(row['kind'])}</b><br>{prompt}<br><i>{caption}</i><br>{html.escape(row['source'])}"
            cells = thumbnail_cell(row["hq"]) + thumbnail_cell(row["lq"]) + thumbnail_cell(row["mask"], mask=True)
            parts.append(f"<tr>{cells}<td>{description}</td></tr>")
        parts.append("</table><h2>Quality scores of accepted images</h2>")
        qualities = [json.loads(q) for q in shards.column("quality").to_pylist() if q]
        for score in SCORES:
            values = [q[score] for q in qualities if isinstance(q.get(score), int | float)]
            if values:
                parts.append(_histogram(values, score))
    if rejects is not None and rejects.num_rows:
        parts.append("<h2>Rejected sources</h2><table><tr><th>source</th><th>stage</th><th>reason</th><th>detail</th></tr>")
        for row in rejects.to_pylist():
            parts.append(
                "<tr>" + "".join(f"<td>{html.escape(str(row[k]))}</td>" for k in ("source", "stage", "reason", "detail")) + "</tr>"
            )
        parts.append("</table>")
    with open(report_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))
