"""Training overhead of Ray Train + DeepSpeed, and ZeRO-2's optimizer-state saving, measured side by side.

    python bench/training.py [--resolution 320] [--batch-size 4] [--steps 8] [--warmup 2]

1. Samples/s of the adaptor stage (tiny preset) in a plain single-process torch loop (AdamW, the same gradient
   clipping) against the same step under Ray Train with DeepSpeed ZeRO-2 and 1 worker, both on the same
   materialised batches (built identically in each process), so the difference is what Ray Train + DeepSpeed
   add. Goal: overhead <= 10%; the model should take >= 0.5 s per step (raise --resolution/--batch-size).
2. Bytes of Adam moment tensors per rank, 2 ranks: DeepSpeed ZeRO-2 against plain DDP. Goal: <= 0.55x.

Both use one thread per process. The GPU half (SDXL size, bf16, MFU) needs a session lent a device (DESIGN.md):
it is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_batches(count: int, resolution: int, batch_size: int):
    """Deterministic training batches from the bundled photos (the same in every process)."""
    import numpy as np
    import skimage.data
    import torch
    from PIL import Image

    from restoration.degradations import realesrgan_degrade
    from training.stages import Batch

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    rng = np.random.default_rng(0)
    batches = []
    for index in range(count):
        hq, lq = [], []
        for item in range(batch_size):
            photo = np.asarray(Image.fromarray(photos[(index * batch_size + item) % len(photos)]).resize((resolution, resolution)))
            sample = realesrgan_degrade(photo, rng)
            hq.append(sample.hq)
            lq.append(sample.lq if sample.lq.shape == sample.hq.shape else photo)
        to_tensor = lambda images: torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
        batches.append(
            Batch(to_tensor(hq), to_tensor(lq), torch.zeros(batch_size, resolution, resolution, dtype=torch.uint8),
                  ["a photo"] * batch_size, ["Remove all degradation"] * batch_size, ["realesrgan"] * batch_size)
        )  # fmt: skip
    return batches


def _stage(options: dict):
    import torch

    from restoration.restorer import Restorer
    from training.config import TrainConfig
    from training.stages import Stage

    torch.set_num_threads(1)
    config = TrainConfig(stage="adaptor", batch_size=options["batch_size"], resolution=options["resolution"], lr=1e-5)
    return Stage(Restorer("tiny"), config), config


def plain_loop(options: dict) -> float:
    """Samples/s of the single-process torch loop."""
    import torch

    stage, config = _stage(options)
    optimizer = torch.optim.AdamW(stage.parameters, lr=config.lr)
    batches = make_batches(options["steps"] + options["warmup"], options["resolution"], options["batch_size"])
    for index, batch in enumerate(batches):
        if index == options["warmup"]:
            started = time.perf_counter()
        inputs = stage.prepare(batch, torch.Generator().manual_seed(index))
        optimizer.zero_grad(set_to_none=True)
        loss = stage.module(**inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.parameters, config.grad_clip)
        optimizer.step()
    return options["steps"] * options["batch_size"] / (time.perf_counter() - started)


def deepspeed_loop(options: dict) -> None:
    """Ray Train worker: the same steps through a DeepSpeed engine; reports samples/s and Adam moment bytes."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch

    from training.trainer import deepspeed_config

    stage, config = _stage(options)
    config = config.model_copy(update={"zero_stage": 2})
    optimizer = torch.optim.AdamW(stage.parameters, lr=config.lr)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=stage.module, optimizer=optimizer, config=deepspeed_config(config), dist_init_required=False
    )
    batches = make_batches(options["steps"] + options["warmup"], options["resolution"], options["batch_size"])
    for index, batch in enumerate(batches):
        if index == options["warmup"]:
            started = time.perf_counter()
        inputs = stage.prepare(batch, torch.Generator().manual_seed(index))
        loss = engine(**inputs)
        engine.backward(loss)
        engine.step()
    elapsed = time.perf_counter() - started
    _report({"samples_per_s": options["steps"] * options["batch_size"] / elapsed})


def moments_loop(options: dict) -> None:
    """Ray Train worker, 2 ranks: one plain DDP step (every rank holds all Adam moments), then one ZeRO-2 step on a
    fresh copy of the stage in the same process group; the moment bytes of each. One worker group for both
    measurements: a group's start-up costs more than the steps."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch

    from training.trainer import deepspeed_config

    batch = make_batches(1, options["resolution"], options["batch_size"])[0]
    stage, config = _stage(options)
    module = ray.train.torch.prepare_model(stage.module, move_to_device=False)
    optimizer = torch.optim.AdamW(stage.parameters, lr=config.lr)
    module(**stage.prepare(batch, torch.Generator().manual_seed(0))).backward()
    optimizer.step()
    ddp = _moment_bytes(optimizer)

    stage, config = _stage(options)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=stage.module,
        optimizer=torch.optim.AdamW(stage.parameters, lr=config.lr),
        config=deepspeed_config(config.model_copy(update={"zero_stage": 2})),
        dist_init_required=False,
    )
    engine.backward(engine(**stage.prepare(batch, torch.Generator().manual_seed(0))))
    engine.step()
    _report({"ddp": ddp, "zero2": _moment_bytes(optimizer.optimizer)})


def _report(metrics: dict) -> None:
    """Train V2 keeps a result's metrics with its checkpoint: report rank 0's numbers with a small one."""
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "metrics.json").write_text(json.dumps(metrics))
        checkpoint = ray.train.Checkpoint.from_directory(directory) if ray.train.get_context().get_world_rank() == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)


def _moment_bytes(optimizer) -> int:
    import torch

    return sum(
        tensor.nbytes
        for state in optimizer.state.values()
        for key, tensor in state.items()
        if key in ("exp_avg", "exp_avg_sq") and torch.is_tensor(tensor)
    )


def _fit(loop, options: dict, workers: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = Path(options["storage"]).resolve()
    trainer = TorchTrainer(
        loop,
        train_loop_config=options,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-{loop.__name__}-{workers}-{time.time_ns()}", storage_path=str(storage)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--storage", default="/tmp/restoray-bench-training")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    options = {
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "storage": args.storage,
    }

    plain = plain_loop(options)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_ds = _fit(deepspeed_loop, options, workers=1)["samples_per_s"]
        moments = _fit(moments_loop, options, workers=2)
        ddp, zero2 = moments["ddp"], moments["zero2"]
    finally:
        ray.shutdown()
    step_seconds = args.batch_size / plain
    print(
        f"adaptor stage, tiny preset, {args.resolution}x{args.resolution}, batch {args.batch_size}, {args.steps} timed steps, one thread\n"
    )
    print(f"{'loop':<40}{'samples/s':>12}{'s/step':>10}{'ratio':>8}")
    print(f"{'plain torch (single process)':<40}{plain:>12.3f}{step_seconds:>10.3f}{1.0:>8.2f}")
    print(f"{'Ray Train + DeepSpeed ZeRO-2, 1 worker':<40}{ray_ds:>12.3f}{args.batch_size / ray_ds:>10.3f}{ray_ds / plain:>8.2f}")
    print(
        f"\noverhead: {(1 - ray_ds / plain) * 100:.1f}% (goal <= 10%)"
        + ("" if step_seconds >= 0.5 else "  [step < 0.5 s: raise --resolution]")
    )
    print(f"\n{'Adam moments per rank, 2 ranks':<40}{'MiB':>12}{'ratio':>8}")
    print(f"{'plain DDP':<40}{ddp / 2**20:>12.2f}{1.0:>8.2f}")
    print(f"{'DeepSpeed ZeRO-2':<40}{zero2 / 2**20:>12.2f}{zero2 / ddp:>8.2f}")
    print(f"\nZeRO-2 / DDP moment bytes: {zero2 / ddp:.3f}x (goal <= 0.55)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
