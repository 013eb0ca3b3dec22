"""The `[serve]` section and what the application is built from (`AppConfig`): light to import (no Ray, no torch).

`restoray serve` builds an `AppConfig` from a run (its preset, [sampler], [restore], [storage], [mlflow] and
[serve] sections); `serving/config.yaml` (for `serve run` / `serve deploy`) holds the same settings as the builder's
`args`, written by `restoray serve --write-config`, never by hand.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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


class DeploymentSettings(StrictModel):
    """One deployment's replicas: resources, autoscaling bounds and queue limits."""

    num_cpus: float = Field(0.25, ge=0, description="CPUs per replica (fractions let the tiny preset fit a 2-CPU machine).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share a GPU between replicas).")
    min_replicas: int = Field(1, ge=0, description="Autoscaling: fewest replicas.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling: most replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Autoscaling: ongoing requests per replica it aims at.")
    max_ongoing_requests: int = Field(8, ge=1, description="Requests a replica takes at once (its batch and its local queue).")
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests waiting for a replica before callers get 503 + Retry-After (-1: no limit)."
    )


def _deployment(**values) -> DeploymentSettings:
    return DeploymentSettings(**values)


class ServeConfig(StrictModel):
    """The `[serve]` section: `restoray serve` and the Ray Serve application (`restoray list config`)."""

    host: str = Field("127.0.0.1", description="HTTP host Serve's proxy binds (0.0.0.0 to listen on every interface).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of Serve's proxy.")
    weights: str | None = Field(
        None,
        description="The default model: a weights directory, s3://, models:/NAME/VERSION (requests may name another with "
        "`model`); unset: the run's preset with its untrained adaptor.",
    )
    index: str | None = Field(None, description="Reference index (local or s3://) for references=auto; unset: no Retriever.")
    models_per_replica: int = Field(2, ge=1, description="Model versions a Restorer replica keeps loaded (LRU).")
    max_batch_size: int = Field(4, ge=1, description="Requests the Restorer batches into one forward pass.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill.")
    request_timeout_s: float = Field(300.0, gt=0, description="Serve's end-to-end HTTP timeout: later answers are 408.")
    retry_after_s: float = Field(2.0, ge=0, description="Retry-After of 503 answers when a queue is full.")
    auth: bool = Field(True, description="Bearer-token auth on /v1/* (tokens from tokens_env or token_file).")
    tokens_env: str = Field("RESTORAY_SERVE_TOKENS", description="Environment variable holding accepted tokens (comma-separated).")
    token_file: str | None = Field(None, description="File with accepted tokens, one per line (e.g. a mounted secret).")
    jobs_kept: int = Field(256, ge=1, description="Finished jobs (and their results) kept for GET /v1/jobs/{id}.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits.")
    ingress: DeploymentSettings = Field(
        default_factory=lambda: _deployment(num_cpus=0.1, max_ongoing_requests=64, max_queued_requests=256),
        description="The HTTP ingress (FastAPI).",
    )
    restorer: DeploymentSettings = Field(
        default_factory=lambda: _deployment(num_cpus=0.5, max_ongoing_requests=8, max_queued_requests=32),
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


class AppConfig(StrictModel):
    """Everything the application is built from: the builder's args (serving.app.app_builder)."""

    preset: str = Field("tiny", description="Model preset of the default model (and of the captioner and retrieval embedder).")
    serve: ServeConfig = Field(default_factory=ServeConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Sampler defaults of requests.")
    restore: RestoreConfig = Field(default_factory=RestoreConfig, description="Restore defaults of requests.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


OutputFormat = Literal["png", "jpeg", "webp"]
