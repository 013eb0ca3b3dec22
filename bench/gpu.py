"""GPU benchmark at SDXL size: measured seconds, peak memory and FLOP/s beside `restoray plan`'s predictions.

    python bench/gpu.py [--preset supir-v0] [--plan plan.json] [--compile] [--steps 4]
    python bench/gpu.py --tiny          # the tiny preset at 64 px on the CPU (what the test suite runs)

Networks: the preset's at full size with random weights from their configs (restoration.planning.configs; no download),
in bf16 on CUDA (restore.dtype auto), held as `restoray restore` holds them. Rows, each in one run on one device:
- matmul: the dense bf16 matmul rate (8192^3, best of a few), the reference every FLOP/s is compared with;
- restore at --size (1024): stage 1, one sampling step with CFG (two adapted-UNet passes; s/step from the restore's own
  sampling phase, the device synchronised after each step), decode; with --compile also the step under torch.compile;
- ReFIR paired and shared, one reference, at --size;
- restore at twice the size, tiled (diffusion tiles, tiled VAE);
- one adaptor training step at --train-size, batch 1 (plain torch, the trained parameters in fp32 under bf16
  autocast, AdamW; no DeepSpeed), with and without gradient checkpointing.
Printed per row: seconds, peak memory (torch.cuda.max_memory_allocated; the process's RSS growth on the CPU), achieved
TFLOP/s (the plan's FLOPs / seconds) and its share of the measured matmul rate, and the plan's predicted peak.
`--plan FILE` takes `restoray plan --json` output made beforehand (on any machine: it needs no GPU), so a lent
device's minutes go to the measurements; without it the plan is made here first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
GiB = 2**30


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> float:
    import psutil
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    return psutil.Process().memory_info().rss


def _peak(device, start: float) -> float:
    import psutil
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return max(0.0, psutil.Process().memory_info().rss - start)  # a rough stand-in on the CPU


def matmul_rate(device, dtype, n: int, repeats: int = 5) -> float:
    """The dense matmul rate (FLOP/s), best of `repeats`."""
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (cuBLAS heuristics)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def build_restorer(preset: str, device, directory: Path):
    """The preset's networks at full size with random weights, built on the device in its dtype (no fp32 copy)."""
    import torch

    from restoration.models.presets import load_preset
    from restoration.planning.configs import random_weight_preset, write_preset
    from restoration.precision import resolve_dtype
    from restoration.restorer import Restorer

    dtype = resolve_dtype("auto", device)
    path = write_preset(random_weight_preset(load_preset(preset)), directory / f"{preset}-random.toml")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            restorer = Restorer(str(path))
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # zero-initialised connectors would make the adaptor a no-op
        for parameter in restorer.model.trainable_parameters():
            parameter.normal_(0, 0.01)
    return restorer.to(device, dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="supir-v0")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per timed restore")
    parser.add_argument("--plan", default=None, metavar="FILE", help="`restoray plan --json` output for this preset and sizes")
    parser.add_argument("--compile", action="store_true", help="also time the sampling step under torch.compile")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset at 64 px on the CPU (tests)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.size, args.train_size, args.steps = "tiny", 64, 64, 2

    import numpy as np
    import torch
    from PIL import Image

    from restoration.planning.plan import PlanConfig, plan
    from restoration.settings import RestoreConfig, SamplerConfig

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.plan:
        predicted = json.loads(Path(args.plan).read_text(encoding="utf-8"))
        wanted = {"preset": args.preset, "size": args.size, "train_size": args.train_size}
        got = {key: predicted["config"][key] for key in wanted}
        if got != wanted:
            raise SystemExit(f"--plan {args.plan} was made for {got}, not {wanted}")
    else:
        print(f"planning {args.preset} (fake tensors on the CPU) ...", file=sys.stderr, flush=True)
        predicted = plan(PlanConfig(preset=args.preset, size=args.size, train_size=args.train_size, gpus=1))
    phases = {row["phase"]: row for row in predicted["phases"]}
    size, big = args.size, 2 * args.size

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rate = matmul_rate(device, dtype, 8192 if device.type == "cuda" else 256)
    rows: list[dict] = [{"row": f"matmul ({str(dtype).removeprefix('torch.')})", "seconds": None, "tflops": rate / 1e12}]

    with tempfile.TemporaryDirectory(prefix="restoray-bench-") as tmp:
        restorer = build_restorer(args.preset, device, Path(tmp))
    generator = np.random.default_rng(0)
    image = Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8))
    reference = Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8))
    sampler = SamplerConfig(steps=args.steps)
    sync_each_step = lambda info: _sync(device)  # noqa: E731  (step boundaries are real on an async device)

    def restore(label: str, picture, step_phase: str, **kwargs) -> None:
        restorer.restore(picture, prompt="a photo", sampler=SamplerConfig(steps=1), **kwargs)  # warm-up
        start = _reset_peak(device)
        result = restorer.restore(picture, prompt="a photo", sampler=sampler, on_step=sync_each_step, **kwargs)
        _sync(device)
        peak = _peak(device, start)
        per_step = result.seconds["sampling"] / args.steps
        step = phases[step_phase]
        rows.append(
            {
                "row": f"{label}: one step",
                "seconds": per_step,
                "tflops": step["flops"] / per_step / 1e12,
                "peak_gib": peak / GiB,
                "plan_peak_gib": predicted["peaks"][step["workload"]]["none"] / GiB,
            }
        )
        rows.append({"row": f"{label}: stage 1 + decode", "seconds": result.seconds["stage1"] + result.seconds["decode"]})

    restore(f"restore {size}", image, f"restore {size}: one step")
    restore(f"ReFIR {size} paired", image, f"ReFIR {size} paired: one step", references=[reference])
    restore(
        f"ReFIR {size} shared", image, f"ReFIR {size} shared: one step", references=[reference], options=RestoreConfig(refir_cfg="shared")
    )
    restore(f"restore {big} tiled", image.resize((big, big), Image.BICUBIC), f"restore {big} tiled: one step")
    if args.compile:
        eager = restorer.model
        restorer.model = torch.compile(eager)
        try:
            restore(f"restore {size} compiled", image, f"restore {size}: one step")
        finally:
            restorer.model = eager

    for checkpointing in (False, True):
        rows.append(train_step(restorer, predicted, device, args.train_size, checkpointing))

    print(f"bench/gpu.py: preset {args.preset} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} "
          f"({str(restorer.dtype).removeprefix('torch.')}), {args.steps} timed steps per restore")  # fmt: skip
    print(f"{'row':<34}{'seconds':>9}{'TFLOP/s':>9}{'of matmul':>10}{'peak GiB':>10}{'plan GiB':>10}")
    for row in rows:
        seconds = f"{row['seconds']:.4f}" if row.get("seconds") is not None else "-"
        tflops = f"{row['tflops']:.2f}" if row.get("tflops") is not None else "-"
        share = f"{row['tflops'] / (rate / 1e12):.0%}" if row.get("tflops") is not None and row["seconds"] is not None else "-"
        peak = f"{row['peak_gib']:.2f}" if row.get("peak_gib") is not None else "-"
        planned = f"{row['plan_peak_gib']:.2f}" if row.get("plan_peak_gib") is not None else "-"
        print(f"{row['row']:<34}{seconds:>9}{tflops:>9}{share:>10}{peak:>10}{planned:>10}")
    print("peak: the whole restore's (or training step's), beside the plan's peak of the same workload with every network resident")
    if device.type != "cuda":
        print("(CPU: peak is the process's RSS growth, not comparable with the plan's device memory)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "matmul_tflops": rate / 1e12, "rows": rows}, indent=2))
    return 0


def train_step(restorer, predicted: dict, device, train_size: int, checkpointing: bool) -> dict:
    """One adaptor step at batch 1: the trained parameters in fp32 (the optimizer's masters), the frozen networks in the
    run's dtype, forward under autocast, AdamW. Plan: the frozen networks + 16 B per trained parameter (fp32 weight,
    gradient, Adam moments) + the measured activations; no ZeRO partitioning or buckets (one process)."""
    import torch

    from restoration.models.adaptor import enable_gradient_checkpointing
    from restoration.precision import place

    model = restorer.model
    trained = model.trainable_parameters()
    dtype = restorer.dtype
    for parameter in trained:
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    enable_gradient_checkpointing(model, checkpointing)
    model.train()
    optimizer = torch.optim.AdamW(trained, lr=1e-6)
    latent = train_size // restorer.vae_factor
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, device=device, dtype=dtype)
    pooled_width = model.unet.add_embedding.linear_1.in_features - 6 * model.unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled_width, device=device, dtype=dtype), "time_ids": torch.ones(1, 6, device=device)}

    def step() -> None:
        x = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            eps = model(x, torch.full((1,), 500.0, device=device), embeds, added, x, embeds, added)
        torch.nn.functional.mse_loss(eps.float(), torch.randn_like(eps, dtype=torch.float32)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        step()  # warm-up: the optimizer's state exists from here on
        start = _reset_peak(device)
        _sync(device)
        started = time.perf_counter()
        step()
        _sync(device)
        seconds = time.perf_counter() - started
        peak = _peak(device, start)
    finally:
        enable_gradient_checkpointing(model, False)
        model.eval()
        for parameter in trained:
            parameter.requires_grad_(False)
        place(model, dtype=dtype)
    mode = "checkpointing" if checkpointing else "plain"
    training = predicted["training"]
    row = training["steps"][mode]
    trained_count = training["trainable_parameters"]
    element = torch.finfo(dtype).bits // 8
    frozen = training["resident_bytes"] - trained_count * element
    plan_bytes = frozen + 16 * trained_count + row["activation_bytes_base"] + row["activation_bytes_per_sample"]
    return {
        "row": f"train {train_size} batch 1{' (checkpointing)' if checkpointing else ''}",
        "seconds": seconds,
        "tflops": row["flops_per_sample"] / seconds / 1e12,
        "peak_gib": peak / GiB,
        "plan_peak_gib": plan_bytes / GiB,
    }


if __name__ == "__main__":
    sys.exit(main())
