"""Config of a training run: the `[train]` table. Validated up front, so a bad run fails before any worker starts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from restoration.config_model import StrictModel

STAGES = ("adaptor", "encoder", "experts", "estimator")


class TrainConfig(StrictModel):
    stage: Literal["adaptor", "encoder", "experts", "estimator"] = Field(
        "adaptor",
        description="What is trained: adaptor (SUPIR/SPIRE adaptor + connectors, diffusion loss through the frozen "
        "UNet), encoder (degradation-robust VAE encoder), experts (one ABAIR LoRA expert, `expert`), estimator "
        "(ABAIR degradation estimator).",
    )
    data: str | None = Field(
        None, description="Dataset written by `restoray data build` (its OUTPUT directory or OUTPUT/shards), local or s3://."
    )
    init_from: str | None = Field(
        None,
        description="Trained weights to start from (path, s3:// or models:/NAME/VERSION), e.g. a trained adaptor "
        "before its experts; unset: the preset's untrained parts.",
    )
    resolution: int = Field(
        1024,
        ge=64,
        multiple_of=64,
        description="Square training crop size in pixels (SDXL trains at 1024; local.toml uses 256 because "
        "several sample photos are under 512 px on the short side).",
    )
    steps: int = Field(1000, ge=1, description="Optimizer steps in all (a resumed run continues up to this count).")
    batch_size: int = Field(1, ge=1, description="Micro-batch per worker.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (gradient accumulation).")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate (SUPIR: 1e-5).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping (0: off).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker; leave some to Ray Data, which prepares the batches.")
    data_cpus: float = Field(
        0.5, gt=0, description="CPUs per Ray Data task reading and preparing batches (fractional: they are light and share cores)."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How the workers' placement group lays them on nodes (Ray Train's ScalingConfig): PACK fills few "
        "nodes, SPREAD puts them on different nodes where it can and still runs on fewer (a lost node's workers restart "
        "on the others), STRICT_* refuse to start otherwise.",
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="0 trains on CPU (DeepSpeed with DS_ACCELERATOR=cpu over gloo).")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage: 2 shards optimizer states and gradients, 3 also parameters.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (DeepSpeed offload).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Training precision: the engine module runs in it (DeepSpeed keeps the trained parameters' fp32 masters "
        "and Adam moments) and the frozen networks are held in it. bf16 also runs on CPU (DeepSpeed's CPU backend); fp16 "
        "needs GPUs.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute the adaptor's and UNet's block activations in backward.")
    caption_dropout: float = Field(0.05, ge=0, le=1, description="Probability that the semantic prompt is emptied.")
    restoration_prompt_dropout: float = Field(
        0.1, ge=0, le=1, description="Probability that the restoration prompt becomes 'Remove all degradation'."
    )
    degrade_on_the_fly: bool = Field(
        False, description="Re-degrade realesrgan/parameterized rows from their HQ crop at every epoch (fresh LQ each time)."
    )
    expert: str | None = Field(None, description="Stage experts: the degradation type name whose LoRA expert is trained.")
    expert_rank: int = Field(4, ge=1, description="LoRA rank of a new expert.")
    estimator_types: list[str] | None = Field(
        None, description="Stage estimator: degradation type names it tells apart (unset: every registered type)."
    )
    encoder_latent_weight: float = Field(1.0, ge=0, description="Stage encoder: weight of the latent term beside the pixel term.")
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint (DeepSpeed sharded state) every N steps, and at the end.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage.")
    validate_every: int = Field(0, ge=0, description="Log a validation restoration to MLflow every N steps (0: only at the end).")
    validation_steps: int = Field(10, ge=1, description="Sampler steps of a validation restoration.")
    log_every: int = Field(1, ge=1, description="Metrics to MLflow every N steps.")
    max_failures: int = Field(2, ge=0, description="Restarts from the last checkpoint after a worker fails.")
    storage_path: str = Field(
        "data/train", description="Checkpoints and exports (Ray Train storage). Several nodes: s3:// or a shared mount."
    )
    name: str | None = Field(None, description="Run name (and Ray Train experiment); unset: restoray-<stage>. Same name = resume.")
    register_model: bool = Field(True, description="Register the exported model in MLflow as restoray-<stage>.")
    preserve_order: bool = Field(
        False,
        description="Feed rows in the shards' order (Ray Data preserve_order): with a fixed seed the run is reproducible "
        "step for step (the golden loss curve), at some cost in throughput.",
    )
    data_label_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels the training feed's Ray Data tasks are kept to (ExecutionOptions.label_selector), e.g. "
        "{'restoray.io/pool' = 'cpu'}: the KubeRay CPU group, off the GPU workers; empty: any node.",
    )
    max_decode_failure_share: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Fail the run when more than this share of the rows read so far do not decode (counted, logged to MLflow).",
    )
    decode_failure_min_rows: int = Field(100, ge=1, description="Rows read before the decode-failure share is checked.")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.stage == "experts" and not self.expert:
            raise ValueError("stage 'experts' needs train.expert, the degradation type whose expert is trained (e.g. 'noise')")
        from restoration.degradations import REGISTRY

        known = [degradation.name for degradation in REGISTRY.all()]
        unknown = [name for name in [self.expert, *(self.estimator_types or [])] if name is not None and name not in known]
        if unknown:
            raise ValueError(f"unknown degradation types {unknown} (train.expert / train.estimator_types); known: {', '.join(known)}")
        if self.precision == "fp16" and self.gpus_per_worker == 0:
            raise ValueError(
                "precision 'fp16' needs GPUs (gpus_per_worker > 0; DeepSpeed's CPU backend has no fp16); on CPU use 'bf16' or 'fp32'"
            )
        if self.offload_optimizer and self.gpus_per_worker == 0:
            raise ValueError("offload_optimizer moves optimizer states from GPU to CPU memory; on CPU leave it false")
        return self

    @property
    def run_name(self) -> str:
        return self.name or f"restoray-{self.stage}"
