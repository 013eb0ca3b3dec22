"""`restoray restore-batch`: check the settings, pin the weights and index (the actors resolve them on their own
nodes), refuse node-local paths on a cluster, run the Ray Data job, print its summary."""

from __future__ import annotations

import argparse

from restoration.errors import InputError
from restoray.config import RunConfig
from restoray.ray_env import cluster_address, connect, loopback_only, on_cluster
from restoray.restore import restore_settings
from runtime.config import MlflowConfig, absolute_tracking_uri
from runtime.resolve import pin
from runtime.storage import as_path, check_shared_storage


def pinned_model(config: RunConfig, args: argparse.Namespace) -> tuple[str, MlflowConfig]:
    """The model a job's actors load (a pinned URI, or a preset name) and the MLflow config they find it with."""
    weights = pin(args.weights, config.storage, config.mlflow) if args.weights else (args.preset or config.preset)
    return weights, MlflowConfig(tracking_uri=absolute_tracking_uri(config.mlflow), experiment=config.mlflow.experiment)


def model_tracking(weights: str, mlflow: MlflowConfig) -> str | None:
    """The tracking URI every node must reach when the actors load a registered model, else None."""
    return mlflow.tracking_uri if weights.startswith("models:/") else None


def run_restore_batch(config: RunConfig, args: argparse.Namespace) -> int:
    if not cluster_address(config.ray):
        loopback_only()
    from pipelines.restore_batch import restore_batch

    sampler, options = restore_settings(config, args)
    if (args.references == "auto") != (args.index is not None):
        raise InputError("--references auto needs --index URI (and --index is only used with --references auto)")
    weights, mlflow = pinned_model(config, args)
    index = pin(args.index, config.storage, config.mlflow) if args.index else None
    paths = {"--input": args.input, "--output": args.output, "--weights": as_path(weights), "--index": as_path(index)}
    check_shared_storage(on_cluster(config.ray), paths, config.storage, model_tracking(weights, mlflow))
    print(f"Ray: {connect(config.ray)}")
    summary = restore_batch(
        args.input,
        args.output,
        config.restore_batch,
        config.data,
        weights,
        sampler,
        options,
        config.storage,
        index=index,
        prompt=args.prompt,
        expert_weights=options.expert_weights if args.experts is not None else None,
        mlflow=mlflow,
    )
    print(summary.table())
    return 0
