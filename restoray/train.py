"""`restoray train`: resolve the run (weights URI, tracking URI, storage), refuse node-local storage on a Ray
cluster, connect to Ray, train, print where the model went."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from restoration.errors import InputError
from restoray import __version__
from restoray.config import RunConfig
from restoray.ray_env import ALREADY_CONNECTED, cluster_address, connect, loopback_only, on_cluster
from runtime.config import absolute_tracking_uri
from runtime.resolve import pin
from runtime.storage import as_path, check_shared_storage

log = logging.getLogger(__name__)


def code_version() -> str:
    """The git commit of the checkout (with `-dirty` when it has local changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"restoray-{__version__}"


def shared_storage_paths(config: RunConfig) -> dict[str, str | None]:
    """What training's workers and checkpoints touch: on a Ray cluster each must be shared storage."""
    return {
        "train.storage_path": config.train.storage_path,
        "train.data": config.train.data,
        "train.init_from": as_path(config.train.init_from),
    }


def run_train(config: RunConfig) -> int:
    summary = train_from_config(config)
    print_summary(config, summary)
    return 0


def train_from_config(config: RunConfig) -> dict:
    """Connect to Ray (the embedded instance unless a cluster is named) and train `config.train`; the summary."""
    if not cluster_address(config.ray):
        loopback_only()
    from restoration.models.presets import load_preset

    train = config.train
    if not train.data:
        raise InputError("train.data is not set: point it at the output of `restoray data build` (--set train.data=PATH)")
    load_preset(config.preset)  # an unknown preset is bad input: fail before Ray starts
    # Pinned, not downloaded: each worker resolves it into its own node's cache (runtime.resolve).
    init = pin(train.init_from, config.storage, config.mlflow) if train.init_from else config.preset
    tracking = absolute_tracking_uri(config.mlflow)
    check_shared_storage(on_cluster(config.ray), shared_storage_paths(config), config.storage, tracking)
    where = connect(config.ray)
    if where != ALREADY_CONNECTED:  # the demo connected already and said so
        print(f"Ray: {where}")

    from training.trainer import run_training

    return run_training(
        train,
        seed=config.seed,
        init=init,
        tracking_uri=tracking,
        experiment=config.mlflow.experiment,
        storage=config.storage,
        params={"config": config.model_dump(mode="json"), "init": init},
        tags={"restoray.code_version": code_version(), "restoray.preset": config.preset},
    )


def print_summary(config: RunConfig, summary: dict, indent: str = "") -> None:
    train = config.train
    metrics = summary["metrics"] or {}
    print(
        f"{indent}trained stage {train.stage!r}: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.4f} "
        f"({summary['rows']} training rows; MLflow run {summary['run_id']}{', resumed' if summary['resumed'] else ''})"
    )
    print(f"{indent}checkpoint: {summary['checkpoint']}")
    if summary["model"]:
        print(f"{indent}model: {summary['model']}  (restoray restore IMAGE --output OUT.png --weights {summary['model']})")
