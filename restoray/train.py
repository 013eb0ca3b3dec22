"""`restoray train`: resolve the run (weights URI, tracking URI, storage), refuse node-local storage on a
multi-node cluster, connect to Ray, train, print where the model went."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from restoration.errors import InputError
from restoray import __version__
from restoray.config import RunConfig
from restoray.ray_env import ALREADY_CONNECTED, cluster_address, connect, loopback_only
from runtime.config import tracking_uri
from runtime.resolve import resolve

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


def check_shared_storage(config: RunConfig, nodes: int, tracking: str) -> None:
    """Several nodes: checkpoints, the dataset and MLflow must be reachable from every node (DESIGN.md, Storage)."""
    if nodes <= 1:
        return
    train = config.train
    local = [
        f"train.{key}={value!r}"
        for key, value in (("storage_path", train.storage_path), ("data", train.data))
        if value and not value.startswith("s3://") and not train.shared_filesystem
    ]
    if tracking.startswith(("sqlite:", "file:")) or "://" not in tracking:
        local.append(f"mlflow.tracking_uri={tracking!r}")
    if local:
        raise InputError(
            f"the cluster has {nodes} nodes, so these must be shared storage (s3:// or a mount every node sees, declared "
            f"with train.shared_filesystem=true; MLflow as an http(s) tracking server): {', '.join(local)}"
        )


def run_train(config: RunConfig) -> int:
    summary = train_from_config(config)
    print_summary(config, summary)
    return 0


def train_from_config(config: RunConfig) -> dict:
    """Connect to Ray (the embedded instance unless a cluster is named) and train `config.train`; the summary."""
    if not cluster_address(config.ray):
        loopback_only()
    from restoration.models.presets import load_preset
    from training.tracking import absolute_tracking_uri

    train = config.train
    if not train.data:
        raise InputError("train.data is not set: point it at the output of `restoray data build` (--set train.data=PATH)")
    load_preset(config.preset)  # an unknown preset is bad input: fail before Ray starts
    init = resolve(train.init_from, config.storage, config.mlflow) if train.init_from else config.preset
    tracking = absolute_tracking_uri(tracking_uri(config.mlflow))
    where = connect(config.ray)
    if where != ALREADY_CONNECTED:  # the demo connected already and said so
        print(f"Ray: {where}")
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    check_shared_storage(config, nodes, tracking)

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
