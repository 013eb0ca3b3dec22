"""The `[serve]` section and what the application is built from (`AppConfig`): light to import (no Ray, no torch).

`restoray serve` builds an `AppConfig` from a run (its preset, [sampler], [restore], [storage], [mlflow] and
[serve] sections); `serving/config.yaml` (for `serve run` / `serve deploy`) holds the same settings as the builder's
`args`, written by `restoray serve --write-config`, never by hand.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from restoration.config_model import StrictModel
from restoration.settings import RestoreConfig, SamplerConfig
from runtime.config import MlflowConfig, StorageConfig


class LimitsConfig(StrictModel):
    """What one request may ask for; beyond it the request is refused (413 / 415 / 422, naming the field)."""

    max_upload_bytes: int = Field(
        32 * 2**20, ge=1024, description="Largest request body, checked from Content-Length and enforced while the body streams (413)."
    )
    max_pixels_in: int = Field(
        4096 * 4096, ge=64, description="Largest input image (width x height), read from the header before decoding (413)."
    )
    max_pixels_out: int = Field(4096 * 4096, ge=64, description="Largest output image: input size x upscale (422 on upscale).")
    min_side: int = Field(8, ge=1, description="Smallest input side in pixels (422).")
    max_steps: int = Field(100, ge=1, description="Most sampling steps a request may ask for.")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt or restoration prompt, in characters.")
    max_cfg: float = Field(30.0, ge=1, description="Largest classifier-free guidance scale.")
    max_tau_r: float = Field(50.0, gt=0, description="Largest restoration-guidance exponent tau_r.")
    max_control_scale: float = Field(4.0, gt=0, description="Largest adaptor control scale.")
    max_upscale: float = Field(8.0, ge=1, description="Largest super-resolution factor.")
    max_references: int = Field(4, ge=0, description="Most uploaded references, and the largest retrieval_k.")
    requests_per_minute: int = Field(
        0,
        ge=0,
        description="Restores (POST /v1/restore, POST /v1/jobs) one token may start per minute across every ingress replica "
        "(counted by the job board); beyond it 429 + Retry-After. 0: no limit.",
    )


class DeploymentSettings(StrictModel):
    """One deployment's replicas: resources, autoscaling bounds and queue limits."""

    num_cpus: float = Field(0.25, ge=0, description="CPUs per replica (fractions let the tiny preset fit a 2-CPU machine).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share a GPU between replicas).")
    min_replicas: int = Field(1, ge=0, description="Autoscaling: fewest replicas.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling: most replicas.")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Autoscaling: ongoing requests per replica it aims at; unset: the Restorer's max_batch_size, 2 elsewhere."
    )
    max_ongoing_requests: int = Field(8, ge=1, description="Requests a replica takes at once (its batch and its local queue).")
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests waiting for a replica before callers get 503 + Retry-After (-1: no limit)."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Autoscaling: how long load stays high before a replica is added.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Autoscaling: how long load stays low before a replica is removed.")
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="How long a stopping replica may finish its requests before it is killed (longer than a restore)."
    )


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MODEL = "default"


def _deployment(**values) -> DeploymentSettings:
    return DeploymentSettings(**values)


class ServeConfig(StrictModel):
    """The `[serve]` section: `restoray serve` and the Ray Serve application (`restoray list config`)."""

    host: str = Field("127.0.0.1", description="HTTP host Serve's proxy binds (0.0.0.0 to listen on every interface).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of Serve's proxy.")
    weights: str | None = Field(
        None,
        description="The default model (named `default`): a weights directory, s3://, models:/NAME/VERSION or "
        "models:/NAME@ALIAS; unset: the run's preset with its untrained adaptor.",
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="More models a request may name (`model` field or serve_multiplexed_model_id header): name -> weights "
        "directory, s3://, models:/NAME/VERSION or models:/NAME@ALIAS. Only these names and `default` are served.",
    )
    index: str | None = Field(None, description="Reference index (local or s3://) for references=auto; unset: no Retriever.")
    models_per_replica: int = Field(2, ge=1, description="Model versions a Restorer replica keeps loaded (LRU).")
    max_batch_size: int = Field(4, ge=1, description="Requests the Restorer batches into one forward pass.")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="How long a batch that is not full waits for more. 0: a batch takes what is queued when the Restorer "
        "is free, so a lone request never waits, and requests arriving during a restoration form the next batch.",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Serve's end-to-end HTTP timeout: later answers are 408.")
    retry_after_s: float = Field(2.0, ge=0, description="Retry-After of 503 answers when a queue is full.")
    auth: bool = Field(True, description="Bearer-token auth on /v1/* (tokens from tokens_env or token_file).")
    tokens_env: str = Field("RESTORAY_SERVE_TOKENS", description="Environment variable holding accepted tokens (comma-separated).")
    token_file: str | None = Field(None, description="File with accepted tokens, one per line (e.g. a mounted secret).")
    jobs_kept: int = Field(256, ge=1, description="Finished jobs (and their results) kept for GET /v1/jobs/{id}.")
    jobs_dir: str | None = Field(
        None,
        description="Where job state and results live (local path or s3://; shared storage on a cluster), so they survive "
        "the board's and the ingress's restarts; unset: a directory under the node's temp dir (one machine only).",
    )
    max_pending_jobs: int = Field(64, ge=1, description="Unfinished jobs at most; POST /v1/jobs beyond it is 503 + Retry-After.")
    job_ttl_s: float = Field(3600.0, gt=0, description="A job (finished or not) and its result are removed this long after it was created.")
    job_lease_s: float = Field(
        30.0, gt=0, description="A running job whose ingress has not renewed its lease for this long is marked failed."
    )
    progress_every_s: float = Field(0.25, gt=0, description="How often a Restorer replica sends its jobs' progress to the board (batched).")
    max_event_streams: int = Field(
        32, ge=1, description="Open GET /v1/jobs/{id}/events streams per ingress replica; beyond it 503 + Retry-After."
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits.")
    ingress: DeploymentSettings = Field(
        default_factory=lambda: _deployment(num_cpus=0.1, max_ongoing_requests=64, max_queued_requests=256),
        description="The HTTP ingress (FastAPI).",
    )
    restorer: DeploymentSettings = Field(
        default_factory=lambda: _deployment(
            num_cpus=0.5, max_ongoing_requests=8, max_queued_requests=32, graceful_shutdown_timeout_s=300.0
        ),
        description="The Restorer (diffusion) deployment.",
    )
    captioner: DeploymentSettings = Field(
        default_factory=lambda: _deployment(num_cpus=0.2, max_ongoing_requests=8, max_queued_requests=32),
        description="The Captioner (the preset's VLM) deployment.",
    )
    retriever: DeploymentSettings = Field(
        default_factory=lambda: _deployment(num_cpus=0.2, max_ongoing_requests=16, max_queued_requests=64),
        description="The Retriever (index + reference store) deployment.",
    )

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, str]) -> dict[str, str]:
        for name, uri in models.items():
            if not MODEL_NAME.match(name):
                raise ValueError(f"{name!r} is not a model name (letters, digits, . _ -; at most 64 characters)")
            if name == DEFAULT_MODEL:
                raise ValueError(f"{DEFAULT_MODEL!r} is serve.weights; give the other models other names")
            if not uri.strip():
                raise ValueError(f"{name!r}: an empty URI")
        return models

    @model_validator(mode="after")
    def _autoscaling_fills_batches(self) -> ServeConfig:
        # Below max_batch_size ongoing requests per replica the autoscaler adds replicas before a batch can fill.
        if self.restorer.target_ongoing_requests is not None and self.restorer.target_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"restorer.target_ongoing_requests ({self.restorer.target_ongoing_requests:g}) is below max_batch_size "
                f"({self.max_batch_size}): replicas would be added before one batch fills"
            )
        return self


class AppConfig(StrictModel):
    """Everything the application is built from: the builder's args (serving.app.app_builder)."""

    preset: str = Field("tiny", description="Model preset of the default model (and of the captioner and retrieval embedder).")
    serve: ServeConfig = Field(default_factory=ServeConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Sampler defaults of requests.")
    restore: RestoreConfig = Field(default_factory=RestoreConfig, description="Restore defaults of requests.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


OutputFormat = Literal["png", "jpeg", "webp"]
