"""The `[storage]` and `[mlflow]` sections of a run: where remote objects are cached, how S3 is reached and retried,
and which MLflow tracking server runs log to."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from restoration.config_model import StrictModel

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class StorageConfig(StrictModel):
    cache_dir: str = Field(
        "~/.cache/restoray",
        description="Local cache that s3:// and models:/ URIs are downloaded into before use, on each node ($VARS and ~ "
        "expanded where it is used).",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, moto, other clouds). Unset: AWS_ENDPOINT_URL if set, else AWS."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="S3 connect timeout per request (an unreachable endpoint fails fast).")
    read_timeout_s: float = Field(60.0, gt=0, description="S3 read timeout per request.")
    client_attempts: int = Field(3, ge=1, description="botocore's attempts per request (its own retry of throttling and 5xx).")
    attempts: int = Field(
        5,
        ge=1,
        description="Our attempts of one read or write after a storage error (403, throttling, timeout, 5xx, reset) outlasts botocore's.",
    )
    backoff_s: float = Field(0.5, ge=0, description="First wait between our attempts; doubles each time.")
    max_backoff_s: float = Field(8.0, ge=0, description="Longest wait between our attempts.")
    shared_filesystem: bool = Field(
        False,
        description="Declare that local paths are on a mount every node shares (else a job connected to a Ray cluster needs "
        "s3:// for inputs, outputs, weights and checkpoints, and MLflow as a tracking server).",
    )


class MlflowConfig(StrictModel):
    tracking_uri: str | None = Field(
        None,
        description=f"MLflow tracking URI. Unset: MLFLOW_TRACKING_URI if set, else {DEFAULT_TRACKING_URI} in the working directory.",
    )
    experiment: str = Field("restoray", description="MLflow experiment that runs are logged under.")


def tracking_uri(config: MlflowConfig) -> str:
    """The config's value (a file or --set) wins, then MLFLOW_TRACKING_URI, then the local sqlite store."""
    return config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def absolute_tracking_uri(config: MlflowConfig) -> str:
    """The tracking URI a job hands its workers and actors, which may run in another directory: a relative sqlite
    path made absolute against the driver's."""
    uri = tracking_uri(config)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri
