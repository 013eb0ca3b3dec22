"""`restoray eval`, `restoray eval score` and `restoray eval compare`: resolve the model, run the protocol (or score
the folders) on Ray, print the table."""

from __future__ import annotations

import argparse

from restoration.evaluation.conventions import MetricConvention
from restoray.config import RunConfig
from restoray.ray_env import cluster_address, connect, loopback_only, on_cluster
from restoray.restore import restore_settings
from restoray.restore_batch import model_tracking, pinned_model
from runtime.resolve import pin
from runtime.storage import as_path, check_shared_storage


def run_eval(config: RunConfig, args: argparse.Namespace) -> int:
    if not cluster_address(config.ray):
        loopback_only()  # before Ray is imported
    from pipelines.evaluate import evaluate
    from restoration.evaluation.learned import plan_metrics
    from restoration.evaluation.protocols import load_protocol

    protocol = load_protocol(args.protocol)  # bad input (an unknown protocol, an unusable metric): before Ray starts
    plan_metrics(config.eval.metrics, config.eval.weights.model_dump(), protocol.has_reference)
    convention = None
    if args.convention is not None or args.crop_border is not None:
        base = protocol.convention
        convention = MetricConvention(args.convention or base.name, base.crop_border if args.crop_border is None else args.crop_border)
    sampler, options = restore_settings(config, args)
    weights, mlflow = pinned_model(config, args)
    index = pin(args.index, config.storage, config.mlflow) if args.index else None  # ReFIR: references from it, per case
    paths = {"--data": args.data, "--output": args.output, "--weights": as_path(weights), "--index": as_path(index)}
    check_shared_storage(on_cluster(config.ray), paths, config.storage, model_tracking(weights, mlflow))
    print(f"Ray: {connect(config.ray)}")
    summary = evaluate(
        weights,
        args.weights or weights,
        args.protocol,
        args.data,
        args.output,
        config.eval,
        config.restore_batch,
        config.data,
        sampler,
        options,
        config.storage,
        mlflow,
        convention,
        index,
    )
    print(summary.table())
    return 0


def run_score(config: RunConfig, args: argparse.Namespace) -> int:
    if not cluster_address(config.ray):
        loopback_only()  # before Ray is imported
    import tempfile

    from pipelines.evaluate import score_folders
    from restoration.evaluation.learned import plan_metrics

    plan_metrics(config.eval.metrics, config.eval.weights.model_dump(), args.gt is not None)  # bad input before Ray starts
    convention = MetricConvention(args.convention or "refir", args.crop_border or 0)
    output = args.output or tempfile.mkdtemp(prefix="restoray-score-")
    # the scoring actors read --pred and --gt on any node; the driver writes --output and the MLflow run
    check_shared_storage(on_cluster(config.ray), {"--pred": args.pred, "--gt": args.gt}, config.storage)
    print(f"Ray: {connect(config.ray)}")
    summary = score_folders(args.pred, args.gt, output, convention, config.eval, config.storage, config.mlflow)
    print(summary.table())
    return 0


def run_compare(config: RunConfig, run_a: str, run_b: str) -> int:
    from pipelines.evaluate import compare

    print(compare(run_a, run_b, config.mlflow))
    return 0
