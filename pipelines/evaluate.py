"""`restoray eval`: a protocol's test set (Ray tasks), restored by the restore-batch job, scored per image, tracked in
MLflow; `restoray eval compare RUN_A RUN_B`.

Layout of OUTPUT: testset/lq/<case>.png and testset/hq/<case>.png (<case>: the source's path relative to the data,
without extension, + `__<type>` for protocols with several cases per source), testset/cases.json, restored/ (the
restore-batch output), scores.parquet (case, type, source, lq, output, hq, one column per metric), summary.json.
"""

from __future__ import annotations

import hashlib
import html
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from pipelines.config import DataBuildConfig, EvalConfig, RestoreBatchConfig
from pipelines.report import MANIFEST, thumbnail_cell
from restoration.errors import InputError
from restoration.evaluation.learned import LEARNED, build_scorer, plan_metrics
from restoration.evaluation.metrics import PLAIN_METRICS
from restoration.evaluation.protocols import Protocol, load_protocol
from restoration.images import ImageDecodeError, decode_image, encode_png
from restoration.settings import RestoreConfig, SamplerConfig
from runtime.config import MlflowConfig, StorageConfig, tracking_uri
from runtime.storage import filesystem, read_bytes, retrying

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
EXPERIMENT = "restoray-eval"


@dataclass
class EvalSummary:
    protocol: str
    weights: str
    output: str
    cases: int
    means: dict[str, float]
    by_type: dict[str, dict[str, float]] = field(default_factory=dict)
    run_id: str | None = None
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        names = list(self.means)
        lines = [
            f"eval {self.protocol} of {self.weights}: {self.cases} cases -> {self.output}",
            f"  {'':<12}" + "".join(f"{n:>10}" for n in names),
        ]
        lines.append(f"  {'all':<12}" + "".join(f"{self.means[n]:>10.4f}" for n in names))
        for kind, means in sorted(self.by_type.items()):  # set metrics (fid) have no per-type value
            lines.append(f"  {kind:<12}" + "".join(f"{means[n]:>10.4f}" if n in means else f"{'-':>10}" for n in names))
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        lines.append(f"  MLflow run {self.run_id} (experiment {EXPERIMENT}), {self.seconds:.1f}s; report: {self.output}/report.html")
        return "\n".join(lines)


def _images_under(uri: str, storage: StorageConfig) -> dict[str, str]:
    """{name relative to uri (posix, with extension): full path} of the image files under a folder."""
    fs, root = filesystem(uri, storage)
    if not fs.exists(root) or not fs.isdir(root):
        raise InputError(f"--data {uri}: no such folder of images")
    root = root.rstrip("/")
    found = {}
    for path in sorted(fs.find(root)):
        if path.lower().endswith(IMAGE_SUFFIXES):
            found[path[len(root) :].lstrip("/")] = path if "://" not in uri else f"{uri.split('://', 1)[0]}://{path}"
    return found


def _decode(uri: str, storage: StorageConfig) -> np.ndarray:
    try:
        return decode_image(read_bytes(uri, storage))
    except ImageDecodeError as err:
        raise InputError(f"{uri}: not a usable test image ({err})") from None


def _write(uri: str, data: bytes, storage: StorageConfig) -> None:
    fs, path = filesystem(uri, storage)

    def put() -> None:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)

    retrying(put, uri, storage, "write")


def case_name(relative: str, case: str) -> str:
    stem = str(PurePosixPath(relative).with_suffix(""))
    return f"{stem}__{case}" if case else stem


def _build_cases(protocol: Protocol, items: list[tuple[str, str]], output: str, storage: StorageConfig) -> list[dict]:
    """One chunk of the test set (a Ray task): each source's cases, written as testset/lq and testset/hq PNGs."""
    rows = []
    for relative, uri in items:
        hq_source = _decode(uri, storage)
        for case in protocol.cases():
            hq, lq, ops = protocol.degrade(hq_source, relative, case)
            name = case_name(relative, case)
            _write(f"{output}/testset/lq/{name}.png", encode_png(lq), storage)
            _write(f"{output}/testset/hq/{name}.png", encode_png(hq), storage)
            rows.append({"case": name, "type": case or protocol.name, "source": uri, "ops": json.dumps(ops)})
    return rows


_build_task = ray.remote(_build_cases)


def build_testset(protocol: Protocol, data_uri: str, output_uri: str, storage: StorageConfig, workers: int) -> list[dict]:
    """The protocol's cases, made by `workers` Ray tasks (the same files for any number of workers)."""
    output = output_uri.rstrip("/")
    if protocol.kind == "paired":
        return _paired_cases(protocol, data_uri, output, storage)
    if protocol.kind == "no_reference":
        return _no_reference_cases(protocol, data_uri, output, storage)
    items = sorted(_images_under(data_uri, storage).items())
    if not items:
        raise InputError(f"--data {data_uri}: no images ({', '.join(IMAGE_SUFFIXES)})")
    chunks = [items[i::workers] for i in range(min(workers, len(items)))]
    rows = [row for chunk in ray.get([_build_task.remote(protocol, chunk, output, storage) for chunk in chunks]) for row in chunk]
    return sorted(rows, key=lambda row: row["case"])


def _no_reference_cases(protocol: Protocol, data_uri: str, output: str, storage: StorageConfig) -> list[dict]:
    images = _images_under(data_uri, storage)
    if not images:
        raise InputError(f"--data {data_uri}: no images ({', '.join(IMAGE_SUFFIXES)})")
    rows = []
    for relative, uri in sorted(images.items()):
        name = case_name(relative, "")
        _write(f"{output}/testset/lq/{name}.png", encode_png(_decode(uri, storage)), storage)
        rows.append({"case": name, "type": protocol.name, "source": uri, "ops": "[]"})
    return rows


def _paired_cases(protocol: Protocol, data_uri: str, output: str, storage: StorageConfig) -> list[dict]:
    lq, hq = (_images_under(f"{data_uri.rstrip('/')}/{part}", storage) for part in ("LQ", "HQ"))
    lq_names, hq_names = {case_name(n, ""): n for n in lq}, {case_name(n, ""): n for n in hq}
    if set(lq_names) != set(hq_names):
        only_lq, only_hq = sorted(set(lq_names) - set(hq_names)), sorted(set(hq_names) - set(lq_names))
        raise InputError(f"--data {data_uri}: LQ/ and HQ/ hold different images (only in LQ: {only_lq[:5]}, only in HQ: {only_hq[:5]})")
    rows = []
    for name in sorted(lq_names):
        low, high = _decode(lq[lq_names[name]], storage), _decode(hq[hq_names[name]], storage)
        expected = (round(low.shape[0] * protocol.upscale), round(low.shape[1] * protocol.upscale))
        if high.shape[:2] != expected:
            raise InputError(f"{name}: HQ is {high.shape[1]}x{high.shape[0]}, LQ x {protocol.upscale:g} is {expected[1]}x{expected[0]}")
        _write(f"{output}/testset/lq/{name}.png", encode_png(low), storage)
        _write(f"{output}/testset/hq/{name}.png", encode_png(high), storage)
        rows.append({"case": name, "type": protocol.name, "source": lq[lq_names[name]], "ops": "[]"})
    return rows


def evaluate(
    weights: str,
    weights_uri: str,
    protocol_name: str,
    data_uri: str,
    output_uri: str,
    config: EvalConfig,
    restore_config: RestoreBatchConfig,
    data: DataBuildConfig,
    sampler: SamplerConfig,
    options: RestoreConfig,
    storage: StorageConfig,
    mlflow_config: MlflowConfig,
) -> EvalSummary:
    """Run a protocol on a model; Ray must be initialised. `weights`: its pinned URI (`runtime.resolve.pin`) or a
    preset name, which the restore-batch actors resolve on their own nodes; `weights_uri`: what the user named
    (recorded)."""
    from pipelines.restore_batch import restore_batch

    started = time.perf_counter()
    protocol = load_protocol(protocol_name)
    plan = plan_metrics(config.metrics, config.weights.model_dump(), protocol.has_reference)
    scorers = {name: build_scorer(name, getattr(config.weights, name), config.lpips_net) for name in plan.names if name in LEARNED}
    output = output_uri.rstrip("/")
    cases = build_testset(protocol, data_uri, output, storage, config.workers)
    _write(f"{output}/testset/cases.json", json.dumps(cases, indent=1).encode(), storage)
    options = options.model_copy(update={"upscale": protocol.upscale})
    restored = f"{output}/restored"
    restore_batch(
        f"{output}/testset/lq",
        restored,
        restore_config,
        data,
        weights,
        sampler,
        options,
        storage,
        prompt=config.prompt,
        mlflow=mlflow_config,
    )
    fs, root = filesystem(restored, storage)
    marker = "/testset/lq/"
    results = {row["source"].split(marker, 1)[-1].rsplit(".", 1)[0]: row for row in _results(fs, root)}
    rows, outputs, references = [], [], []
    crop = protocol.convention.crop_border
    for case in tqdm(cases, desc="scoring", unit="case", disable=not sys.stderr.isatty()):
        result = results.get(case["case"])
        if result is None:
            raise InputError(f"case {case['case']}: the restore-batch job did not restore it (see {restored}/rejects)")
        out = _decode(f"{restored}/{result['output']}", storage)
        hq = _decode(f"{output}/testset/hq/{case['case']}.png", storage) if protocol.has_reference else None
        if hq is not None and out.shape != hq.shape:
            raise InputError(f"case {case['case']}: output {out.shape[1]}x{out.shape[0]} but HQ {hq.shape[1]}x{hq.shape[0]}")
        scores = {name: PLAIN_METRICS[name](out, hq, protocol.convention) for name in plan.full if name in PLAIN_METRICS}
        scores |= {name: scorers[name](_cropped(out, crop), _cropped(hq, crop)) for name in plan.full if name in scorers}
        scores |= {name: scorers[name](_cropped(out, crop)) for name in plan.no_reference}
        if plan.sets:
            outputs.append(_cropped(out, crop))
            references.append(_cropped(hq, crop))
        rows.append({"case": case["case"], "type": case["type"], "source": case["source"], "lq": f"testset/lq/{case['case']}.png",
                     "output": f"restored/{result['output']}", "hq": f"testset/hq/{case['case']}.png" if hq is not None else None,
                     **scores})  # fmt: skip
    per_image = [*plan.full, *plan.no_reference]
    means = {name: float(np.mean([row[name] for row in rows])) for name in per_image}
    means |= {name: scorers[name](outputs, references) for name in plan.sets}
    by_type = {}
    if len({row["type"] for row in rows}) > 1:
        for kind in sorted({row["type"] for row in rows}):
            picked = [row for row in rows if row["type"] == kind]
            by_type[kind] = {name: float(np.mean([row[name] for row in picked])) for name in per_image}
    table = pa.Table.from_pylist(rows)
    local_scores = f"{output}/scores.parquet"
    fs_out, path = filesystem(local_scores, storage)
    with fs_out.open(path, "wb") as handle:
        pq.write_table(table, handle)
    testset_hash = hashlib.sha256("\n".join(f"{c['case']}:{c['source']}:{c['ops']}" for c in cases).encode()).hexdigest()[:16]
    lineage = model_lineage(weights, weights_uri, storage, mlflow_config)
    summary = EvalSummary(protocol.name, weights_uri, output_uri, len(rows), means, by_type, skipped=plan.skipped, lineage=lineage)
    report = f"{output}/report.html" if config.report else None
    if report:
        _write(report, render_report(summary, protocol, rows, per_image, output, storage, config.report_cases).encode(), storage)
    params = {"protocol": protocol.name, "model": weights_uri, "data": data_uri, "testset_hash": testset_hash,
              "color_space": protocol.metrics.color_space, "crop_border": protocol.metrics.crop_border,
              "upscale": protocol.upscale, "skipped_metrics": ", ".join(plan.skipped) or "none", **lineage}  # fmt: skip
    summary.run_id = _track(protocol, params, means, by_type, [local_scores, report], mlflow_config)
    summary.seconds = time.perf_counter() - started
    _write(f"{output}/summary.json", json.dumps(summary.__dict__, indent=1).encode(), storage)
    return summary


def _cropped(image: np.ndarray | None, border: int) -> np.ndarray | None:
    return image[border:-border, border:-border] if border and image is not None else image


def model_lineage(weights: str, weights_uri: str, storage: StorageConfig, mlflow_config: MlflowConfig) -> dict[str, str]:
    """Where the scored model came from: its training run and data, and the SHA-256 of that dataset's manifest.json:
    the line from corpus to model to score. From the weights' training.json (`restoray train`'s export, on a path or
    s3://) or, for a registered model (`weights` pinned to models:/NAME/VERSION, or `weights_uri` naming the model
    whose download `weights` is), from the version's run (its `restoray.dataset` tag). Presets and converted weights
    have no training record: 'none'."""
    run_id, data_uri = "none", "none"
    record = _training_record(weights, storage) if not weights.startswith("models:/") else None
    registered = weights if weights.startswith("models:/") else weights_uri
    if record is not None:
        run_id, data_uri = str(record.get("run_id") or "none"), record.get("data") or "none"
    elif registered.startswith("models:/"):
        import mlflow

        from runtime.resolve import registered_version

        client = mlflow.MlflowClient(tracking_uri(mlflow_config))
        run_id = registered_version(registered, mlflow_config).run_id or "none"
        if run_id != "none":
            data_uri = client.get_run(run_id).data.tags.get("restoray.dataset", "none")
    digest = "none"
    if data_uri != "none":
        try:
            digest = hashlib.sha256(read_bytes(f"{data_uri.rstrip('/')}/{MANIFEST}", storage)).hexdigest()
        except FileNotFoundError:
            digest = "unavailable (no manifest.json at the training data)"
    return {"train_run_id": run_id, "train_data": data_uri, "train_data_manifest_sha256": digest}


def _training_record(weights: str, storage: StorageConfig) -> dict | None:
    """The training.json beside weights on a path or s3://, if there is one (a preset name has none)."""
    if not weights.startswith("s3://") and not Path(weights).is_dir():
        return None
    try:
        return json.loads(read_bytes(f"{weights.rstrip('/')}/training.json", storage))
    except FileNotFoundError:
        return None


def render_report(summary: EvalSummary, protocol: Protocol, rows: list[dict], metrics: list[str], output: str,
                  storage: StorageConfig, cases: int) -> str:  # fmt: skip
    """A self-contained HTML page: the metric table, then LQ / output / HQ side by side per case with its scores."""
    header = "".join(f"<th>{html.escape(name)}</th>" for name in summary.means)
    means = [f"<tr><td>all</td>{''.join(f'<td>{value:.4f}</td>' for value in summary.means.values())}</tr>"]
    for kind, values in sorted(summary.by_type.items()):
        cells = "".join(f"<td>{values[n]:.4f}</td>" if n in values else "<td>-</td>" for n in summary.means)
        means.append(f"<tr><td>{html.escape(kind)}</td>{cells}</tr>")
    skipped = "".join(f"<li>{html.escape(name)}: {html.escape(why)}</li>" for name, why in summary.skipped.items())
    lines = []
    for row in rows[:cases]:
        images = [read_bytes(f"{output}/{row[key]}", storage) if row[key] else None for key in ("lq", "output", "hq")]
        scores = "<br>".join(f"{name} {row[name]:.4f}" for name in metrics)
        cells = "".join(thumbnail_cell(image, 256) for image in images)
        lines.append(f"<tr><td>{html.escape(row['case'])}</td>{cells}<td>{scores}</td></tr>")
    lineage = "".join(f"<li>{html.escape(key)}: {html.escape(value)}</li>" for key, value in summary.lineage.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>restoray eval {html.escape(protocol.name)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px;
vertical-align:top}}img{{image-rendering:pixelated}}</style></head><body>
<h1>eval {html.escape(protocol.name)} of {html.escape(summary.weights)}</h1><p>{html.escape(protocol.description)}</p>
<p>{summary.cases} cases; metric convention: {protocol.metrics.color_space}, border crop {protocol.metrics.crop_border}</p>
<table><tr><th></th>{header}</tr>{"".join(means)}</table>
{f"<h2>Skipped metrics</h2><ul>{skipped}</ul>" if skipped else ""}<h2>Lineage</h2><ul>{lineage}</ul>
<h2>Cases (first {min(cases, len(rows))} of {len(rows)})</h2>
<table><tr><th>case</th><th>LQ</th><th>output</th><th>HQ</th><th>scores</th></tr>{"".join(lines)}</table></body></html>
"""


def _results(fs, root: str) -> list[dict]:
    files = [p for p in fs.find(f"{root}/results") if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(".")]
    return [row for path in sorted(files) for row in pq.read_table(fs.open(path, "rb"), columns=["source", "output"]).to_pylist()]


def _track(protocol: Protocol, params: dict, means: dict, by_type: dict, artifacts: list[str | None], mlflow_config: MlflowConfig) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(mlflow_config))
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"{protocol.name} {params['model']}") as run:
        mlflow.log_params(params)
        mlflow.log_metrics(means)
        mlflow.log_metrics({f"{name}/{kind}": value for kind, values in by_type.items() for name, value in values.items()})
        for artifact in artifacts:
            if artifact and "://" not in artifact:  # local outputs; an s3:// output is already where it lives
                mlflow.log_artifact(artifact)
        return run.info.run_id


def compare(run_a: str, run_b: str, mlflow_config: MlflowConfig) -> str:
    """The metrics of two eval runs side by side with B - A."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri(mlflow_config))
    try:
        runs = [client.get_run(run_id) for run_id in (run_a, run_b)]
    except MlflowException as err:
        raise InputError(f"eval compare: {err.message}") from None
    metrics = [run.data.metrics for run in runs]
    names = sorted(set(metrics[0]) | set(metrics[1]))
    lines = [f"{'metric':<16}{'A':>12}{'B':>12}{'B - A':>12}", f"{'':<16}{run_a[:10]:>12}{run_b[:10]:>12}"]
    for name in names:
        a, b = metrics[0].get(name), metrics[1].get(name)
        delta = f"{b - a:+.4f}" if a is not None and b is not None else "-"
        shown = ["-" if value is None else f"{value:.4f}" for value in (a, b)]  # a metric only one run scored
        lines.append(f"{name:<16}{shown[0]:>12}{shown[1]:>12}{delta:>12}")
    return "\n".join(lines)
