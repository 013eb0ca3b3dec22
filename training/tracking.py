"""MLflow for training: one run per training (its id kept in the run's storage, so restarts and resumed runs log
to the same run), metrics and validation images from rank 0, the exported model logged as a pyfunc wrapping
`Restorer` (loader module `restoration.pyfunc`) and registered as `restoray-<stage>`.

The driver opens the run and logs params and tags; rank 0 logs through `MlflowClient` with the run id (Train V2
refuses `MLflowLoggerCallback`; see DESIGN.md's Ray notes).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from runtime.config import StorageConfig
from runtime.storage import filesystem

log = logging.getLogger(__name__)
RUN_ID_FILE = "mlflow_run_id"


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def open_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    run_id_path: str,
    storage: StorageConfig,
    params: dict[str, Any],
    tags: dict[str, str],
) -> tuple[str, bool]:
    """(run id, resumed): the run recorded at `run_id_path` if it still exists, else a new one (recorded there)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri)
    fs, path = filesystem(run_id_path, storage)
    if fs.exists(path):
        run_id = fs.cat_file(path).decode().strip()
        try:
            client.get_run(run_id)
            client.set_terminated(run_id, status="RUNNING")
            return run_id, True
        except MlflowException:
            log.warning("MLflow run %s recorded in %s is gone from %s; starting a new run", run_id, run_id_path, tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    items = list(flatten(params).items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[start : start + 100]])
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, run.info.run_id.encode())
    return run.info.run_id, False


class RankZeroLogger:
    """Metrics and images to one MLflow run from the training worker of rank 0 (a no-op elsewhere).

    Each metric is logged once per step. A restarted attempt (a lost worker or node) resumes from its last
    checkpoint and runs again the steps it had logged after it; those keep their first values, so a metric's history
    has no step twice."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, enabled: bool):
        self.enabled = enabled and tracking_uri is not None and run_id is not None
        self.logged_up_to: dict[str, int] = {}
        if self.enabled:
            import mlflow

            self.client = mlflow.MlflowClient(tracking_uri)
            self.run_id = run_id

    def last_logged_step(self, key: str) -> int:
        """The last step of `key` in the run (-1: none), asked of MLflow once per attempt."""
        if key not in self.logged_up_to:
            history = self.client.get_metric_history(self.run_id, key)
            self.logged_up_to[key] = max((metric.step for metric in history), default=-1)
        return self.logged_up_to[key]

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        new = [Metric(key, float(value), now, step) for key, value in values.items() if step > self.last_logged_step(key)]
        if new:
            self.client.log_batch(self.run_id, metrics=new)
            self.logged_up_to.update({metric.key: step for metric in new})

    def image(self, step: int, image, name: str = "validation") -> None:
        if self.enabled:
            self.client.log_image(self.run_id, image, artifact_file=f"{name}/step_{step:06d}.png")


# Distributions the `restoration` package imports at load and predict time (restoration/pyfunc.py), pinned to the
# versions this run used: the logged model rebuilds anywhere from its own requirements.txt.
MODEL_REQUIREMENTS = (
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "peft",
    "open-clip-torch",
    "safetensors",
    "pydantic",
    "pillow",
    "numpy",
    "opencv-python-headless",
    "scipy",
    "pandas",
    "pyarrow",
)


def model_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in MODEL_REQUIREMENTS]


def model_code_paths(directory: Path) -> list[str]:
    """Our method package, copied into the model (with its preset files, without bytecode caches): loading needs no
    restoray install."""
    import shutil

    import restoration

    target = directory / "restoration"
    shutil.copytree(Path(restoration.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return [str(target)]


def log_model(tracking_uri: str, run_id: str, export_dir: str, stage: str, register: bool, tags: dict[str, str]) -> str | None:
    """Log the exported weights as a pyfunc model in the run (our code inside, requirements pinned); register it
    as restoray-<stage>. Returns the registered version (None when not registered)."""
    import tempfile

    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    name = f"restoray-{stage}"
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory(prefix="restoray-model-code-") as code:
        info = mlflow.pyfunc.log_model(
            name="model",
            loader_module="restoration.pyfunc",
            data_path=export_dir,
            code_paths=model_code_paths(Path(code)),
            pip_requirements=model_requirements(),
            registered_model_name=name if register else None,
        )
    if not register:
        return None
    client = mlflow.MlflowClient(tracking_uri)
    version = info.registered_model_version
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return str(version)


def log_decode_failures(tracking_uri: str, run_id: str, counter) -> None:
    """The training feed's totals (rows read, rows that did not decode) as run metrics."""
    import mlflow
    import ray

    rows, failed = ray.get(counter.totals.remote())
    mlflow.MlflowClient(tracking_uri).log_batch(
        run_id,
        metrics=[
            mlflow.entities.Metric(key, float(value), int(time.time() * 1000), 0)
            for key, value in (("data.rows_read", rows), ("data.decode_failures", failed))
        ],
    )


def finish(tracking_uri: str, run_id: str, status: str) -> None:
    import mlflow

    mlflow.MlflowClient(tracking_uri).set_terminated(run_id, status=status)
