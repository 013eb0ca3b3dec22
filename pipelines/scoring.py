"""Scoring on Ray, shared by `restoray eval` and `restoray eval score`: per-image metrics in Ray Data actor tasks
(each actor builds the learned scorers once, on a GPU when `eval.num_gpus` is set); the set metric (FID) from
features the same actors extract (2048 float32 per image, streamed back with the scores; the driver holds the two
N x 2048 sets, 8 KiB per image each, for clean-fid's covariance); then scores.parquet, summary.json, report.html and
the MLflow run.

A pair row names its images by URI (`output`, `hq`: None without a reference) and carries `case` and `type`; the
actors decode them where they run, so no image passes through the driver. A pair the metrics cannot score (sizes
differ, an undecodable file) comes back with a `problem`, and the job is refused naming every such case."""

from __future__ import annotations

import html
import json
import tempfile
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines.config import EvalConfig
from pipelines.report import thumbnail_cell
from pipelines.rows import rows_of
from restoration.errors import InputError
from restoration.evaluation.learned import LEARNED, FidFeatures, MetricPlan, build_scorer, frechet_distance
from restoration.evaluation.metrics import CONVENTIONS, PLAIN_METRICS, MetricConvention
from restoration.images import ImageDecodeError, decode_image
from runtime.config import MlflowConfig, StorageConfig, tracking_uri
from runtime.storage import filesystem, is_remote, read_bytes, retrying

EXPERIMENT = "restoray-eval"
FID_COLUMNS = ("fid_output", "fid_hq")  # clean-fid features of a pair, float32 bytes (when fid is scored)
SMALL_ARTIFACT_BYTES = 64 << 20  # an s3:// output's files copied into the MLflow run below this size (its URI always)


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
    convention: str = ""
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        names = list(self.means)
        title = f"eval {self.protocol} of {self.weights}" if self.weights else f"eval {self.protocol}"
        lines = [
            f"{title}: {self.cases} cases -> {self.output}" + (f" ({self.convention})" if self.convention else ""),
            f"  {'':<12}" + "".join(f"{n:>10}" for n in names),
        ]
        lines.append(f"  {'all':<12}" + "".join(f"{self.means[n]:>10.4f}" for n in names))
        for kind, means in sorted(self.by_type.items()):  # set metrics (fid) have no per-type value
            lines.append(f"  {kind:<12}" + "".join(f"{means[n]:>10.4f}" if n in means else f"{'-':>10}" for n in names))
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  warning: {warning}" for warning in self.warnings]
        lines.append(f"  MLflow run {self.run_id} (experiment {EXPERIMENT}), {self.seconds:.1f}s; report: {self.output}/report.html")
        return "\n".join(lines)


def decode_uri(uri: str, storage: StorageConfig) -> np.ndarray:
    try:
        return decode_image(read_bytes(uri, storage))
    except ImageDecodeError as err:
        raise InputError(f"{uri}: not a usable image ({err})") from None


def cropped(image: np.ndarray | None, border: int) -> np.ndarray | None:
    return image[border:-border, border:-border] if border and image is not None else image


class PairScorer:
    """A Ray Data actor: the per-image metrics of pair rows (plain ones under the convention, learned ones built once
    here from their local files, scoring RGB with the convention's border crop)."""

    def __init__(self, plan: MetricPlan, convention: MetricConvention, config: dict, storage: dict):
        import torch

        self.plan, self.convention = plan, convention
        self.config, self.storage = EvalConfig.model_validate(config), StorageConfig.model_validate(storage)
        device = "cuda" if self.config.num_gpus and torch.cuda.is_available() else "cpu"
        per_image = [*plan.full, *plan.no_reference]
        self.scorers = {
            name: build_scorer(name, getattr(self.config.weights, name), self.config.lpips_net, device)
            for name in per_image
            if name in LEARNED
        }
        self.fid = FidFeatures(self.config.weights.fid, device) if "fid" in plan.sets else None

    def __call__(self, batch: dict) -> dict:
        scored = [self.score(row) for row in rows_of(batch)]
        columns = ("case", "problem", *self.plan.full, *self.plan.no_reference, *FID_COLUMNS)
        return {column: np.array([row.get(column) for row in scored], dtype=object) for column in columns}

    def score(self, row: dict) -> dict:
        row = {**row, **{name: None for name in (*self.plan.full, *self.plan.no_reference)}, "problem": None}
        try:
            output = decode_uri(row["output"], self.storage)
            hq = decode_uri(row["hq"], self.storage) if row.get("hq") else None
            if hq is not None and output.shape != hq.shape:
                raise InputError(f"output {output.shape[1]}x{output.shape[0]} but HQ {hq.shape[1]}x{hq.shape[0]}")
            border = self.convention.crop_border
            for name in self.plan.full:
                if name in PLAIN_METRICS:
                    row[name] = PLAIN_METRICS[name](output, hq, self.convention)
                else:
                    row[name] = self.scorers[name](cropped(output, border), cropped(hq, border))
            for name in self.plan.no_reference:
                row[name] = self.scorers[name](cropped(output, border))
            if self.fid is not None:
                row["fid_output"] = self.fid(cropped(output, border)).tobytes()
                row["fid_hq"] = self.fid(cropped(hq, border)).tobytes()
        except (InputError, ValueError) as err:
            row["problem"] = str(err)
        return row


def score_pairs(
    pairs: list[dict], plan: MetricPlan, convention: MetricConvention, config: EvalConfig, storage: StorageConfig
) -> tuple[list[dict], dict[str, float]]:
    """Every pair scored by `config.workers` actors; Ray must be initialised. (rows in the order of `pairs`, each with
    its per-image scores; the set metrics' values)."""
    if not pairs:
        raise InputError("nothing to score: no pairs")
    per_image = [*plan.full, *plan.no_reference]
    order = {pair["case"]: index for index, pair in enumerate(pairs)}
    ray.data.DataContext.get_current().raise_original_map_exception = True  # a storage error stays one (exit 1)
    dataset = ray.data.from_items([{"case": p["case"], "output": p["output"], "hq": p.get("hq") or ""} for p in pairs])
    scored = dataset.map_batches(
        PairScorer,
        fn_constructor_args=(plan, convention, config.model_dump(), storage.model_dump()),
        batch_size=4,
        compute=ray.data.ActorPoolStrategy(size=min(config.workers, len(pairs))),
        num_cpus=1,
        num_gpus=config.num_gpus,
    )
    by_case = {row["case"]: row for row in scored.iter_rows()}
    problems = [f"{case}: {row['problem']}" for case, row in sorted(by_case.items(), key=lambda item: order[item[0]]) if row["problem"]]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise InputError(f"{len(problems)} of {len(pairs)} cases cannot be scored: {shown}")
    rows = [{**pair, **{name: float(by_case[pair["case"]][name]) for name in per_image}} for pair in pairs]
    sets = {}
    if "fid" in plan.sets:
        features = {
            side: np.stack([np.frombuffer(by_case[pair["case"]][f"fid_{side}"], np.float32) for pair in pairs]) for side in ("output", "hq")
        }
        sets["fid"] = frechet_distance(features["output"], features["hq"])
    return rows, sets


def summarise(rows: list[dict], metrics: list[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    means = {name: float(np.mean([row[name] for row in rows])) for name in metrics}
    by_type = {}
    if len({row["type"] for row in rows}) > 1:
        for kind in sorted({row["type"] for row in rows}):
            picked = [row for row in rows if row["type"] == kind]
            by_type[kind] = {name: float(np.mean([row[name] for row in picked])) for name in metrics}
    return means, by_type


def write_outputs(
    summary: EvalSummary, rows: list[dict], metrics: list[str], output: str, config: EvalConfig, storage: StorageConfig,
    description: str, params: dict, mlflow_config: MlflowConfig, images_root: str,
) -> EvalSummary:  # fmt: skip
    """scores.parquet, report.html (when eval.report), the MLflow run, then summary.json. `images_root`: what the rows'
    relative `lq`/`output`/`hq` paths are relative to."""
    scores_uri = f"{output}/scores.parquet"
    fs, path = filesystem(scores_uri, storage)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as handle:
        pq.write_table(pa.Table.from_pylist(rows), handle)
    report = f"{output}/report.html" if config.report else None
    if report:
        page = render_report(summary, description, rows, metrics, images_root, storage, config.report_cases)
        write_bytes(report, page.encode(), storage)
    params = {**params, "convention": summary.convention, "skipped_metrics": ", ".join(summary.skipped) or "none", "output": output}
    summary.run_id = track(summary, params, [scores_uri, report], storage, mlflow_config)
    write_bytes(f"{output}/summary.json", json.dumps(summary.__dict__, indent=1).encode(), storage)
    return summary


def write_bytes(uri: str, data: bytes, storage: StorageConfig) -> None:
    fs, path = filesystem(uri, storage)

    def put() -> None:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)

    retrying(put, uri, storage, "write")


def convention_text(convention: MetricConvention) -> str:
    return f"{convention.name}, border crop {convention.crop_border}"


def render_report(summary: EvalSummary, description: str, rows: list[dict], metrics: list[str], root: str,
                  storage: StorageConfig, cases: int) -> str:  # fmt: skip
    """A self-contained HTML page: the metric table, then LQ / output / HQ side by side per case with its scores."""
    header = "".join(f"<th>{html.escape(name)}</th>" for name in summary.means)
    means = [f"<tr><td>all</td>{''.join(f'<td>{value:.4f}</td>' for value in summary.means.values())}</tr>"]
    for kind, values in sorted(summary.by_type.items()):
        cells = "".join(f"<td>{values[n]:.4f}</td>" if n in values else "<td>-</td>" for n in summary.means)
        means.append(f"<tr><td>{html.escape(kind)}</td>{cells}</tr>")
    skipped = "".join(f"<li>{html.escape(name)}: {html.escape(why)}</li>" for name, why in summary.skipped.items())
    warnings = "".join(f"<li>{html.escape(warning)}</li>" for warning in summary.warnings)
    lines = []
    for row in rows[:cases]:
        images = [read_bytes(_under(root, row[key]), storage) if row.get(key) else None for key in ("lq", "output", "hq")]
        scores = "<br>".join(f"{name} {row[name]:.4f}" for name in metrics)
        if row.get("references"):  # ReFIR: what the case was restored with
            scores += f"<br>reference: {html.escape(row['references'])}"
        cells = "".join(thumbnail_cell(image, 256) for image in images)
        lines.append(f"<tr><td>{html.escape(row['case'])}</td>{cells}<td>{scores}</td></tr>")
    lineage = "".join(f"<li>{html.escape(key)}: {html.escape(value)}</li>" for key, value in summary.lineage.items())
    title = f"eval {summary.protocol}" + (f" of {summary.weights}" if summary.weights else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>restoray {html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px;
vertical-align:top}}img{{image-rendering:pixelated}}</style></head><body>
<h1>{html.escape(title)}</h1><p>{html.escape(description)}</p>
<p>{summary.cases} cases; metric convention: {html.escape(summary.convention)}
({html.escape(CONVENTIONS.get(summary.convention.split(",")[0], ""))})</p>
<table><tr><th></th>{header}</tr>{"".join(means)}</table>
{f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else ""}
{f"<h2>Skipped metrics</h2><ul>{skipped}</ul>" if skipped else ""}{f"<h2>Lineage</h2><ul>{lineage}</ul>" if lineage else ""}
<h2>Cases (first {min(cases, len(rows))} of {len(rows)})</h2>
<table><tr><th>case</th><th>LQ</th><th>output</th><th>HQ</th><th>scores</th></tr>{"".join(lines)}</table></body></html>
"""


def _under(root: str, path: str) -> str:
    return path if "://" in path or path.startswith("/") else f"{root.rstrip('/')}/{path}"


def track(summary: EvalSummary, params: dict, artifacts: list[str | None], storage: StorageConfig, mlflow_config: MlflowConfig) -> str:
    """The MLflow run: params, means, per-type means; local files as artifacts; an s3:// output by its URI (tag
    `restoray.output`), its files copied in when under SMALL_ARTIFACT_BYTES."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(mlflow_config))
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"{summary.protocol} {summary.weights}".strip()) as run:
        mlflow.log_params(params)
        mlflow.set_tag("restoray.output", summary.output)
        if summary.warnings:
            mlflow.set_tag("restoray.warnings", "; ".join(summary.warnings))
        mlflow.log_metrics(summary.means)
        mlflow.log_metrics({f"{name}/{kind}": value for kind, values in summary.by_type.items() for name, value in values.items()})
        for artifact in artifacts:
            if not artifact:
                continue
            if not is_remote(artifact):
                mlflow.log_artifact(artifact)
                continue
            fs, path = filesystem(artifact, storage)
            if fs.size(path) <= SMALL_ARTIFACT_BYTES:
                with tempfile.TemporaryDirectory(prefix="restoray-artifact-") as folder:
                    local = f"{folder}/{path.rsplit('/', 1)[-1]}"
                    fs.get_file(path, local)
                    mlflow.log_artifact(local)
        return run.info.run_id
