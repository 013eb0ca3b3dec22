"""Ray Train + DeepSpeed ZeRO over the training stages.

Driver (`run_training`): checks the shards, opens the MLflow run (one id per run, kept in the run's storage so a
restart or a resumed run logs to the same run), builds the Ray Dataset, runs a `TorchTrainer` with
`FailureConfig(max_failures)` and keeps `keep_checkpoints` checkpoints; at the end logs the exported weights as
an MLflow pyfunc model and registers it.

Worker (`train_loop_per_worker`): builds the `Restorer` (from the preset or `init_from`), the stage, an AdamW
over the stage's trainable parameters only (frozen networks stay out of the optimizer), and a DeepSpeed engine
from the config `deepspeed_config` generates; resumes from `ray.train.get_checkpoint()` at the saved step;
streams batches from `get_dataset_shard("train")`; every `checkpoint_every` steps saves DeepSpeed's sharded
state (each rank its own shards, merged by Ray Train into one checkpoint) and reports it; the last checkpoint
also holds `export/` (the trained parts as safetensors + config, parameters gathered first under ZeRO-3).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from restoration.seeding import torch_generator
from runtime.config import StorageConfig
from training.config import TrainConfig

log = logging.getLogger(__name__)
STATE_TAG = "state"
EXPORT_DIR = "export"


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """DeepSpeed's JSON config, generated from ours (never a hand-kept file)."""
    zero: dict[str, Any] = {"stage": config.zero_stage, "contiguous_gradients": True, "overlap_comm": config.gpus_per_worker > 0}
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if config.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we gather ourselves for the export
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # We pass a torch optimizer; DeepSpeed would otherwise insist on its own CPU Adam under offload.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _to_batch(batch: dict[str, np.ndarray], device: torch.device):
    from training.stages import Batch

    def images(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1

    return Batch(
        hq=images(batch["hq"]),
        lq=images(batch["lq"]),
        masks=torch.from_numpy(np.ascontiguousarray(batch["mask"])).to(device),
        captions=[str(c) for c in batch["caption"]],
        restoration_prompts=[str(p) for p in batch["restoration_prompt"]],
        kinds=[str(k) for k in batch["kind"]],
    )


def _batches(shard, batch_size: int):
    """Endless micro-batches from this worker's shard, epoch after epoch."""
    epoch = 0
    while True:
        count = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True, prefetch_batches=2):
            count += 1
            yield batch
        if count == 0:
            raise RuntimeError(f"this worker's data shard gave no full batch of {batch_size} rows (epoch {epoch})")
        epoch += 1


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    # Before DeepSpeed is imported: on CPU it must pick its CPU accelerator (gloo collectives).
    if loop_config["train"]["gpus_per_worker"] == 0:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from restoration.restorer import Restorer
    from runtime.config import MlflowConfig
    from runtime.resolve import on_this_node
    from training.stages import Stage, prepare_restorer
    from training.tracking import RankZeroLogger

    config = TrainConfig.model_validate(loop_config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config.gpus_per_worker > 0 else torch.device("cpu")
    seed = loop_config["seed"]
    torch.manual_seed(seed)

    # The driver pinned `init` to a URI; each worker loads it from its own node's cache (runtime.resolve).
    init = on_this_node(
        loop_config["init"], StorageConfig.model_validate(loop_config["storage"]), MlflowConfig(tracking_uri=loop_config["tracking_uri"])
    )
    restorer = prepare_restorer(Restorer.from_pretrained(init), config).to(device)
    stage = Stage(restorer, config)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision, torch.float32)
    held = stage.hold_frozen_in(dtype)
    if held and rank == 0:
        logging.getLogger("ray.train").info("[train] frozen networks held in %s: %s", config.precision, ", ".join(held))
    optimizer = torch.optim.AdamW(stage.parameters, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=stage.module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config), dist_init_required=False
    )

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            _, client_state = engine.load_checkpoint(directory, tag=STATE_TAG)
        step = int(client_state["step"])
    # Where this attempt's ranks run and where it starts: after a lost node, the log says which checkpoint resumed
    # and on which nodes the workers came back (node ids as Ray names them).
    nodes: list[str | None] = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank == 0:
        logging.getLogger("ray.train").info(
            "[train] %s; ranks on nodes %s",
            f"resumed from the checkpoint of step {step}" if checkpoint else "started at step 0",
            ", ".join(f"{r}={node}" for r, node in enumerate(nodes)),
        )
    tracker = RankZeroLogger(loop_config.get("tracking_uri"), loop_config.get("run_id"), enabled=rank == 0)
    if checkpoint and tracker.enabled and (logged := tracker.last_logged_step("loss")) > step:
        logging.getLogger("ray.train").info(
            "[train] retracing steps %d..%d: run before the failure, after the checkpoint (MLflow keeps their first values)",
            step + 1,
            logged,
        )
    data = _batches(ray.train.get_dataset_shard("train"), config.batch_size)
    validation_image = validation_target = None

    while step < config.steps:
        started = time.perf_counter()
        losses = []
        for micro in range(config.grad_accum):
            raw = next(data)
            batch = _to_batch(raw, device)
            if validation_image is None:
                from PIL import Image

                validation_image, validation_target = Image.fromarray(raw["lq"][0]), raw["hq"][0]
            inputs = stage.prepare(batch, torch_generator(seed, "step", rank, step, micro))
            inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
            loss = engine(**inputs)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        step += 1
        mean_loss = torch.stack(losses).mean()
        dist.all_reduce(mean_loss)  # the loss over all ranks, as logged
        elapsed = time.perf_counter() - started
        metrics = {
            "loss": mean_loss.item() / world,
            "lr": scheduler.get_last_lr()[0] if scheduler is not None else config.lr,
            "samples_per_s": config.batch_size * config.grad_accum * world / elapsed,
            "memory_mb": _memory_mb(device),
        }
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss is {metrics['loss']} at step {step}; lower train.lr or check the data")
        if step % config.log_every == 0 or step == config.steps:
            tracker.metrics(step, metrics)
            if rank == 0:  # progress in the driver's (and the Ray job's) log, through the logger Ray Train shows
                logging.getLogger("ray.train").info(
                    "[train] step %d/%d  loss %.4f  lr %.2e  %.2f samples/s  %.0f MiB",
                    step, config.steps, metrics["loss"], metrics["lr"], metrics["samples_per_s"], metrics["memory_mb"],
                )  # fmt: skip
        final = step == config.steps
        if (config.validate_every and step % config.validate_every == 0) or final:
            _validate(engine, restorer, config, tracker, step, validation_image, validation_target, rank)
        if step % config.checkpoint_every == 0 or final:
            with tempfile.TemporaryDirectory() as directory:
                engine.save_checkpoint(directory, tag=STATE_TAG, client_state={"step": step})
                if final:
                    _export(engine, restorer, config, Path(directory) / EXPORT_DIR, rank, step, loop_config)
                ray.train.report({"step": step, **metrics}, checkpoint=Checkpoint.from_directory(directory))


def _gathered(engine, config: TrainConfig):
    """All parameters materialised on every rank under ZeRO-3 (a no-op context under ZeRO-2)."""
    import contextlib

    import deepspeed

    if config.zero_stage != 3:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def _validate(engine, restorer, config: TrainConfig, tracker, step: int, image, target, rank: int) -> None:
    """One restoration of a training LQ crop, logged as an image artifact and scored with `restoray eval`'s code and
    metric names (psnr, ssim; ReFIR's convention) against the crop's HQ (diffusion stages only). That HQ is the
    shard's training target (Real-ESRGAN's USM-sharpened one when the build sharpens): a training signal, not an
    evaluation score, which `restoray eval` makes against the original HQ. Every rank restores (its own crop, same
    size): under ZeRO-3 each module call gathers its parameters collectively, so a restore on rank 0 alone would wait
    forever for the others."""
    if config.stage not in ("adaptor", "experts") or image is None:
        return
    from restoration.sampling.edm import SamplerConfig

    was_training = engine.module.training
    engine.module.eval()
    kwargs = {"expert_weights": {config.expert: 1.0}} if config.stage == "experts" else {}
    # Every network runs in the dtype it is held in (DeepSpeed's precision for the engine module, `hold_frozen_in`'s
    # for the frozen ones): restore() casts each call's inputs, so no autocast is needed.
    restored = restorer.restore(image, prompt="", sampler=SamplerConfig(steps=config.validation_steps), seed=0, **kwargs).image
    engine.module.train(was_training)
    if rank == 0:
        tracker.image(step, restored)
        output = np.asarray(restored.convert("RGB"))
        if output.shape == target.shape:
            from restoration.evaluation.metrics import REFIR, psnr, ssim

            tracker.metrics(step, {"psnr": psnr(output, target, REFIR), "ssim": ssim(output, target, REFIR)})
        else:
            log.warning("validation at step %d: restored %s, HQ %s: not scored", step, output.shape, target.shape)


def _export(engine, restorer, config: TrainConfig, directory: Path, rank: int, step: int, loop_config: dict[str, Any]) -> None:
    import json

    import torch.distributed as dist

    with _gathered(engine, config):
        if rank == 0:
            restorer.save_pretrained(directory)
            (directory / "training.json").write_text(
                json.dumps({"stage": config.stage, "step": step, "run_id": loop_config.get("run_id"), "data": config.data}, indent=2)
            )
        dist.barrier()


def _check_resources(config: TrainConfig) -> dict[str, float]:
    """On a fixed-size cluster, workers that take every CPU leave none for the Ray Data tasks preparing their batches
    (listing the shards takes a whole CPU), and training would wait forever: say so instead. (An autoscaling cluster
    is not checked: it adds nodes for the worker group.) Returns what the worker group and its feed need."""
    from runtime.resources import check_cpus_left

    return check_cpus_left(
        config.num_workers * config.cpus_per_worker,
        max(1.0, config.data_cpus),
        f"train.num_workers x train.cpus_per_worker ({config.num_workers} x {config.cpus_per_worker:g})",
        f"the Ray Data tasks that feed them need at least 1 (and train.data_cpus = {config.data_cpus:g} each); "
        "lower train.cpus_per_worker or train.num_workers",
        gpus=config.num_workers * config.gpus_per_worker,
    )


def _ingest_options(preserve_order: bool, label_selector: dict[str, str]):
    """Ray Train's default ingest options, less `exclude_resources` (deprecated, removed after January 2027; copying
    it warns on every run): the feed is kept off the training workers' nodes by a label selector instead."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=preserve_order,
        verbose_progress=current.verbose_progress,
        label_selector=label_selector or None,
    )


def run_training(
    config: TrainConfig,
    *,
    seed: int,
    init: str,
    tracking_uri: str,
    experiment: str,
    storage: StorageConfig,
    params: dict[str, Any],
    tags: dict[str, str],
) -> dict[str, Any]:
    """Train on the connected Ray cluster; returns a summary (run id, steps, metrics, registered version)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from runtime.resources import awaiting_resources
    from runtime.storage import arrow_filesystem
    from training.data import check_shards, manifest_id, new_decode_counter, training_dataset
    from training.tracking import RUN_ID_FILE, finish, log_decode_failures, log_model, open_run

    needs = _check_resources(config)
    shards = check_shards(config, storage, min_rows=config.batch_size * config.num_workers)
    if config.stage == "experts":
        from runtime.config import MlflowConfig
        from runtime.resolve import on_this_node
        from training.stages import require_trained_adaptor

        require_trained_adaptor(on_this_node(init, storage, MlflowConfig(tracking_uri=tracking_uri)))
    manifest = manifest_id(config, storage)
    remote = config.storage_path.startswith("s3://")
    storage_path = config.storage_path if remote else str(Path(config.storage_path).resolve())
    run_dir = f"{storage_path.rstrip('/')}/{config.run_name}"
    dataset_tags = {"restoray.dataset": config.data, "restoray.dataset_manifest": manifest or "none", "restoray.stage": config.stage}
    run_id, resumed = open_run(
        tracking_uri,
        experiment,
        config.run_name,
        f"{run_dir}/{RUN_ID_FILE}",
        storage,
        params={**params, "dataset.manifest_id": manifest, "dataset.rows": shards["rows"]},
        tags={**tags, **dataset_tags},
    )
    log.info("MLflow run %s (%s) at %s", run_id, "resumed" if resumed else "new", tracking_uri)
    decode_counter = new_decode_counter()
    loop_config = {
        "train": config.model_dump(),
        "seed": seed,
        "init": init,
        "storage": storage.model_dump(),
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "decode_counter": decode_counter,
    }
    storage_filesystem, arrow_storage_path = arrow_filesystem(storage_path, storage)  # the same S3 options as every read
    resources = {"CPU": config.cpus_per_worker} | ({"GPU": config.gpus_per_worker} if config.gpus_per_worker else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=config.placement_strategy,
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=arrow_storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
        datasets={"train": training_dataset(config, seed, storage, decode_counter)},
        dataset_config=DataConfig(execution_options=_ingest_options(config.preserve_order, config.data_label_selector)),
    )
    try:
        with awaiting_resources(needs, f"the training worker group ({config.num_workers} workers)"):
            result = trainer.fit()
    except BaseException:
        log_decode_failures(tracking_uri, run_id, decode_counter)
        finish(tracking_uri, run_id, "FAILED")
        raise
    log_decode_failures(tracking_uri, run_id, decode_counter)
    if result.checkpoint is None:
        finish(tracking_uri, run_id, "FAILED")
        raise RuntimeError("training ended without a checkpoint")
    version = None
    with result.checkpoint.as_directory() as directory:
        export = Path(directory) / EXPORT_DIR
        if not export.is_dir():
            finish(tracking_uri, run_id, "FAILED")
            raise RuntimeError(f"the last checkpoint {result.checkpoint.path} holds no {EXPORT_DIR}/ (was train.steps already reached?)")
        version = log_model(tracking_uri, run_id, str(export), config.stage, config.register_model, {"run_id": run_id, **dataset_tags})
    finish(tracking_uri, run_id, "FINISHED")
    return {
        "run_id": run_id,
        "resumed": resumed,
        "metrics": result.metrics,
        "checkpoint": result.checkpoint.path,
        "model": f"models:/restoray-{config.stage}/{version}" if version else None,
        "rows": shards["rows"],
    }
