"""`restoray eval`: a protocol's test set (Ray tasks), restored by the restore-batch job, scored on Ray
(`pipelines.scoring`), tracked in MLflow; `restoray eval score` (folders the user has, matched by name);
`restoray eval compare RUN_A RUN_B`.

Layout of OUTPUT: testset/lq/<case>.png and testset/hq/<case>.png (<case>: the source's path relative to the data,
without extension, + `__<type>` for protocols with several cases per source), testset/cases.json, restored/ (the
restore-batch output), scores.parquet (case, type, source, lq, output, hq, one column per metric), summary.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Literal

import pyarrow.parquet as pq
import ray

from pipelines.config import DataBuildConfig, EvalConfig, RestoreBatchConfig
from pipelines.report import MANIFEST
from pipelines.scoring import EvalSummary, convention_text, decode_uri, score_pairs, summarise, write_bytes, write_outputs
from restoration.errors import InputError
from restoration.evaluation.conventions import MetricConvention
from restoration.evaluation.learned import MetricPlan, plan_metrics
from restoration.evaluation.protocols import PairedSet, Protocol, load_protocol
from restoration.images import encode_png
from restoration.seeding import numpy_generator
from restoration.settings import RestoreConfig, SamplerConfig
from runtime.config import MlflowConfig, StorageConfig, tracking_uri
from runtime.storage import filesystem, read_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
EXPERIMENT = "restoray-eval"


def _images_under(uri: str, storage: StorageConfig, flag: str = "--data") -> dict[str, str]:
    """{name relative to uri (posix, with extension): full path} of the image files under a folder."""
    fs, root = filesystem(uri, storage)
    if not fs.exists(root) or not fs.isdir(root):
        raise InputError(f"{flag} {uri}: no such folder of images")
    root = root.rstrip("/")
    found = {}
    for path in sorted(fs.find(root)):
        if path.lower().endswith(IMAGE_SUFFIXES):
            found[path[len(root) :].lstrip("/")] = path if "://" not in uri else f"{uri.split('://', 1)[0]}://{path}"
    return found


def case_name(relative: str, case: str) -> str:
    stem = str(PurePosixPath(relative).with_suffix(""))
    return f"{stem}__{case}" if case else stem


def _build_cases(protocol: Protocol, items: list[tuple[str, str]], output: str, storage: StorageConfig) -> list[dict]:
    """One chunk of the test set (a Ray task): each source's cases, written as testset/lq and testset/hq PNGs."""
    rows = []
    for relative, uri in items:
        hq_source = decode_uri(uri, storage)
        for case in protocol.cases():
            hq, lq, ops = protocol.degrade(hq_source, relative, case)
            name = case_name(relative, case)
            write_bytes(f"{output}/testset/lq/{name}.png", encode_png(lq), storage)
            write_bytes(f"{output}/testset/hq/{name}.png", encode_png(hq), storage)
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
    _refuse_shared_names([relative for relative, _ in items], data_uri)
    chunks = [items[i::workers] for i in range(min(workers, len(items)))]
    rows = [row for chunk in ray.get([_build_task.remote(protocol, chunk, output, storage) for chunk in chunks]) for row in chunk]
    return sorted(rows, key=lambda row: row["case"])


def _refuse_shared_names(relatives: list[str], data_uri: str) -> None:
    """Cases are named by path without extension: photo.jpg and photo.png would write one case's files twice."""
    seen: dict[str, str] = {}
    for relative in relatives:
        name = case_name(relative, "")
        if name in seen:
            raise InputError(f"--data {data_uri}: {seen[name]} and {relative} would both be case {name!r}; rename one")
        seen[name] = relative


def _no_reference_cases(protocol: Protocol, data_uri: str, output: str, storage: StorageConfig) -> list[dict]:
    images = _images_under(data_uri, storage)
    if not images:
        raise InputError(f"--data {data_uri}: no images ({', '.join(IMAGE_SUFFIXES)})")
    _refuse_shared_names(list(images), data_uri)
    rows = []
    for relative, uri in sorted(images.items()):
        name = case_name(relative, "")
        write_bytes(f"{output}/testset/lq/{name}.png", encode_png(decode_uri(uri, storage)), storage)
        rows.append({"case": name, "type": protocol.name, "source": uri, "ops": "[]"})
    return rows


def _keyed(uri: str, storage: StorageConfig, flag: str, key_of: Callable[[str], str | None], wanted: str) -> dict[str, str]:
    """{pairing key: URI} of the images under a folder, keyed by `key_of(path relative to it, without extension)`;
    files it gives None are left out (RealSR keeps LR and HR in one folder). Two files with one key (a.png and a.jpg)
    are refused: one would take the other's place. `wanted` says what no match means."""
    found: dict[str, str] = {}
    for relative, full in sorted(_images_under(uri, storage, flag).items()):
        key = key_of(_stem_key(relative))
        if key is None:
            continue
        if key in found:
            raise InputError(f"{flag} {uri}: {found[key]} and {full} are both {key!r}; pairs are matched by name, rename one")
        found[key] = full
    if not found:
        raise InputError(f"{flag} {uri}: no {wanted}")
    return found


def _paired_side(folder: str, pairs: PairedSet, side: Literal["lq", "hq"], storage: StorageConfig) -> dict[str, str]:
    pattern = pairs.lq_key if side == "lq" else pairs.hq_key
    return _keyed(folder, storage, "--data", lambda stem: pairs.key(stem, side), f"{side.upper()} images match {pattern!r}")


def _paired_cases(protocol: Protocol, data_uri: str, output: str, storage: StorageConfig) -> list[dict]:
    data = data_uri.rstrip("/")
    missing = [f"{data}/{folder}" for pairs in protocol.pairs for folder in (pairs.hq, None if pairs.noise_sigma else pairs.lq)
               if folder is not None and not _is_folder(f"{data}/{folder}", storage)]  # fmt: skip
    if missing:
        raise InputError(f"--data {data_uri}: protocol {protocol.name} needs these folders, which are missing: {', '.join(missing)}")
    several = len(protocol.pairs) > 1
    rows = []
    for pairs in protocol.pairs:
        high_files = _paired_side(f"{data}/{pairs.hq}", pairs, "hq", storage)
        low_files = _paired_side(f"{data}/{pairs.lq}", pairs, "lq", storage) if pairs.noise_sigma is None else high_files
        if set(low_files) != set(high_files):
            only_lq, only_hq = sorted(set(low_files) - set(high_files)), sorted(set(high_files) - set(low_files))
            raise InputError(
                f"--data {data_uri}: {pairs.lq}/ and {pairs.hq}/ hold different images "
                f"(only in LQ: {only_lq[:5]}, only in HQ: {only_hq[:5]})"
            )
        for key in sorted(high_files):
            name = f"{pairs.name}/{key}" if several else key
            high = decode_uri(high_files[key], storage)
            if pairs.noise_sigma is None:
                low = decode_uri(low_files[key], storage)
                expected = (round(low.shape[0] * protocol.upscale), round(low.shape[1] * protocol.upscale))
                if high.shape[:2] != expected:
                    shown = f"HQ is {high.shape[1]}x{high.shape[0]}, LQ x {protocol.upscale:g} is {expected[1]}x{expected[0]}"
                    raise InputError(f"{name}: {shown} (the protocol's upscale)")
            else:
                low = pairs.noisy(high, numpy_generator(protocol.seed, protocol.name, name, "noise"))
            write_bytes(f"{output}/testset/lq/{name}.png", encode_png(low), storage)
            write_bytes(f"{output}/testset/hq/{name}.png", encode_png(high), storage)
            rows.append({"case": name, "type": pairs.name or protocol.name, "source": low_files[key], "ops": "[]"})
    return rows


def _is_folder(uri: str, storage: StorageConfig) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.isdir(path)


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
    convention: MetricConvention | None = None,
    index: str | None = None,
) -> EvalSummary:
    """Run a protocol on a model; Ray must be initialised. `weights`: its pinned URI (`runtime.resolve.pin`) or a
    preset name, which the restore-batch actors resolve on their own nodes; `weights_uri`: what the user named
    (recorded); `convention`: scored in this instead of the protocol's; `index`: a pinned reference index, ReFIR's
    references retrieved per case (restore.retrieval_k, restore.min_similarity), recorded per case."""
    from pipelines.restore_batch import restore_batch

    started = time.perf_counter()
    protocol = load_protocol(protocol_name)
    plan = plan_metrics(config.metrics, config.weights.model_dump(), protocol.has_reference)
    output = output_uri.rstrip("/")
    cases = build_testset(protocol, data_uri, output, storage, config.workers)
    write_bytes(f"{output}/testset/cases.json", json.dumps(cases, indent=1).encode(), storage)
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
        index=index,
    )
    fs, root = filesystem(restored, storage)
    marker = "/testset/lq/"
    results = {row["source"].split(marker, 1)[-1].rsplit(".", 1)[0]: row for row in _results(fs, root)}
    unrestored = [case["case"] for case in cases if case["case"] not in results]
    if unrestored:
        raise InputError(f"cases {unrestored[:5]}: the restore-batch job did not restore them (see {restored}/rejects)")
    pairs = [{"case": case["case"], "type": case["type"], "source": case["source"], "lq": f"testset/lq/{case['case']}.png",
              "output": f"restored/{results[case['case']]['output']}",
              "hq": f"testset/hq/{case['case']}.png" if protocol.has_reference else None,
              "references": _references_used(results[case["case"]])} for case in cases]  # fmt: skip
    convention = convention or protocol.convention
    located = [{**pair, "output": f"{output}/{pair['output']}", "hq": pair["hq"] and f"{output}/{pair['hq']}"} for pair in pairs]
    scored, set_values = score_pairs(located, plan, convention, config, storage)
    per_image = [*plan.full, *plan.no_reference]
    rows = [{**pair, **{name: row[name] for name in per_image}} for pair, row in zip(pairs, scored, strict=True)]
    means, by_type = summarise(rows, per_image)
    means |= set_values
    testset_hash = hashlib.sha256("\n".join(f"{c['case']}:{c['source']}:{c['ops']}" for c in cases).encode()).hexdigest()[:16]
    lineage = model_lineage(weights, weights_uri, storage, mlflow_config)
    summary = EvalSummary(protocol.name, weights_uri, output_uri, len(rows), means, by_type, skipped=plan.skipped, lineage=lineage,
                          convention=convention_text(convention), warnings=set_size_warnings(plan, len(rows), config))  # fmt: skip
    params = {"protocol": protocol.name, "model": weights_uri, "data": data_uri, "testset_hash": testset_hash,
              "crop_border": convention.crop_border, "upscale": protocol.upscale, "index": index or "none", **lineage}  # fmt: skip
    summary.seconds = time.perf_counter() - started
    return write_outputs(summary, rows, per_image, output, config, storage, protocol.description, params, mlflow_config, output)


def set_size_warnings(plan: MetricPlan, images: int, config: EvalConfig) -> list[str]:
    return [
        f"{name} over {images} images, below eval.min_fid_images = {config.min_fid_images}: its covariance is rank-deficient "
        "and the value is not comparable with papers' (thousands of images)"
        for name in plan.sets
        if images < config.min_fid_images
    ]


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


def _results(fs, root: str) -> list[dict]:
    files = [p for p in fs.find(f"{root}/results") if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(".")]
    rows = []
    for path in sorted(files):
        table = pq.read_table(fs.open(path, "rb"))
        rows += table.select([name for name in ("source", "output", "references") if name in table.column_names]).to_pylist()
    return rows


def _references_used(result: dict) -> str:
    """The references a case was restored with, as `source (similarity)`; "" without any."""
    used = json.loads(result.get("references") or "[]")
    return "; ".join(f"{reference['source']} ({reference['similarity']:.3f})" for reference in used)


def _stem_key(relative: str) -> str:
    """A file's pairing key: its path relative to its folder without the extension (a container member's as it is)."""
    return relative if "#" in relative else str(PurePosixPath(relative).with_suffix(""))


def _restore_batch_outputs(pred_uri: str, storage: StorageConfig) -> dict[str, str] | None:
    """{key: output URI} of a restore-batch output folder (its results/ map of source -> output; the key is the
    source's path relative to the sources' common folder), None when `pred_uri` is not one."""
    fs, root = filesystem(pred_uri, storage)
    if not fs.isdir(f"{root}/results"):
        return None
    rows = _results(fs, root)
    if not rows:
        return None
    sources = [row["source"].split("://", 1)[-1] for row in rows]
    common = os.path.commonpath([source.partition("#")[0].rsplit("/", 1)[0] or "/" for source in sources])
    found: dict[str, str] = {}
    for source, row in zip(sources, rows, strict=True):
        key = _stem_key(source[len(common) :].lstrip("/"))
        if key in found:
            raise InputError(f"--pred {pred_uri}: two sources are both {key!r} (results/); pairs are matched by name without extension")
        found[key] = f"{pred_uri.rstrip('/')}/{row['output']}"
    return found


def match_folders(pred_uri: str, gt_uri: str | None, storage: StorageConfig) -> list[dict]:
    """The pairs of `eval score`: prediction and ground truth matched by path without extension (through results/
    when --pred is a restore-batch output); a file on either side without its match is refused, all of them named."""
    images = f"images ({', '.join(IMAGE_SUFFIXES)})"
    predictions = _restore_batch_outputs(pred_uri, storage) or _keyed(pred_uri, storage, "--pred", lambda stem: stem, images)
    if gt_uri is None:
        return [{"case": key, "type": "score", "output": uri, "hq": None} for key, uri in sorted(predictions.items())]
    truths = _keyed(gt_uri, storage, "--gt", lambda stem: stem, images)
    only_pred, only_gt = sorted(set(predictions) - set(truths)), sorted(set(truths) - set(predictions))
    if only_pred or only_gt:
        raise InputError(
            f"--pred and --gt do not pair up: {len(only_pred)} only in --pred {only_pred[:10]}, {len(only_gt)} only in --gt {only_gt[:10]}"
        )
    return [{"case": key, "type": "score", "output": predictions[key], "hq": truths[key]} for key in sorted(predictions)]


def score_folders(
    pred_uri: str,
    gt_uri: str | None,
    output_uri: str,
    convention: MetricConvention,
    config: EvalConfig,
    storage: StorageConfig,
    mlflow_config: MlflowConfig,
) -> EvalSummary:
    """`restoray eval score`: images the user already has, scored as `eval` scores (no-reference without --gt);
    Ray must be initialised."""
    started = time.perf_counter()
    plan = plan_metrics(config.metrics, config.weights.model_dump(), gt_uri is not None)
    pairs = match_folders(pred_uri, gt_uri, storage)
    scored, set_values = score_pairs(pairs, plan, convention, config, storage)
    per_image = [*plan.full, *plan.no_reference]
    means, _ = summarise(scored, per_image)
    means |= set_values
    summary = EvalSummary("score", "", output_uri, len(scored), means, skipped=plan.skipped, convention=convention_text(convention),
                          warnings=set_size_warnings(plan, len(scored), config))  # fmt: skip
    description = f"{pred_uri} scored against {gt_uri}" if gt_uri else f"{pred_uri} scored without a reference"
    params = {"protocol": "score", "pred": pred_uri, "gt": gt_uri or "none", "crop_border": convention.crop_border}
    summary.seconds = time.perf_counter() - started
    rows = [{**row, "lq": None} for row in scored]
    return write_outputs(summary, rows, per_image, output_uri.rstrip("/"), config, storage, description, params, mlflow_config, "")


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
