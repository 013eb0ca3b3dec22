"""restore-batch benchmark, side by side in one run (tiny preset, synthetic images at its native 64 px, 2 steps).

1. Ray overhead: images/s of `restoray restore-batch` with one actor computing on one thread against `Restorer.restore` in a loop
   in one process on the same images (goal: within 15 %). Both the whole job and the job without Ray's start are shown, at the
   default restore_batch.batch_size (images of one size share a `restore_batch` call, which the loop does not) and at
   batch_size 1 (one image per model call, as the loop): the second is Ray's overhead alone.
2. Scaling: one actor against two (one thread each, on the machine's two cores) (goal >= 1.6x; Ray's own processes share the machine).
3. Peak memory of the job's processes (sampled every 0.2 s) at N and 2N images: flat means streaming.

    python bench/restore_batch.py [--images 48] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{index:04d}.png")


def direct(folder: Path, steps: int) -> float:
    import torch
    from PIL import Image

    from restoration.restorer import Restorer
    from restoration.settings import SamplerConfig

    torch.set_num_threads(1)
    restorer = Restorer("tiny")
    images = [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.png"))]
    sampler = SamplerConfig(steps=steps)
    restorer.restore(images[0], prompt="a photo", sampler=sampler)
    started = time.perf_counter()
    for image in images:
        restorer.restore(image, prompt="a photo", sampler=sampler)
    return len(images) / (time.perf_counter() - started)


def job(folder: Path, output: Path, steps: int, cpus: int, actors: int, batch_size: int | None = None) -> dict:
    """One `restoray restore-batch` in its own process (its own embedded Ray), with the peak RSS of its process tree."""
    import psutil

    command = [sys.executable, "-m", "restoray", "restore-batch", "--input", str(folder), "--output", str(output),
               "--steps", str(steps), "--prompt", "a photo", "--set", f"ray.num_cpus={cpus}",
               "--set", f"restore_batch.actors={actors}", "--set", "restore_batch.num_cpus=0.5"]  # fmt: skip
    if batch_size is not None:
        command += ["--set", f"restore_batch.batch_size={batch_size}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=output.parent)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while process.poll() is None:
            try:
                tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, _ = process.communicate()
    sampler.join()
    took = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"restore-batch failed:\n{stdout[-2000:]}")
    manifest = json.loads((output / "manifest.json").read_text())
    return {"rate": manifest["restored"] / took, "job_rate": manifest["restored"] / manifest["seconds"], "peak": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="restoray-bench-") as temp:
        root = Path(temp)
        make_images(root / "small", args.images)
        make_images(root / "large", 2 * args.images)
        loop = direct(root / "small", args.steps)
        # Each actor computes on one thread (OMP_NUM_THREADS=1) and holds 0.5 CPU, so that the read and decode tasks
        # beside two actors still fit the machine's two cores (restore_batch's CPU check).
        one = job(root / "small", root / "one", args.steps, cpus=2, actors=1)
        unbatched = job(root / "small", root / "unbatched", args.steps, cpus=2, actors=1, batch_size=1)
        two = job(root / "small", root / "two", args.steps, cpus=2, actors=2)
        large = job(root / "large", root / "large-out", args.steps, cpus=2, actors=1)
    print(f"\nrestore-batch bench (tiny preset, {args.images} images of 64x64, {args.steps} steps)")
    print(f"{'measure':<58} {'value':>12}  goal")
    print(f"{'Restorer.restore loop, one process, 1 thread':<58} {loop:>8.2f} im/s")
    print(f"{'restore-batch, 1 actor, 1 thread (whole command)':<58} {one['rate']:>8.2f} im/s")
    print(f"{'restore-batch, 1 actor, 1 thread (job, without Ray start)':<58} {one['job_rate']:>8.2f} im/s")
    print(f"{'restore-batch, 1 actor, batch 1 (job, without Ray start)':<58} {unbatched['job_rate']:>8.2f} im/s")
    overhead = 1 - unbatched["job_rate"] / loop
    verdict = "met" if overhead <= 0.15 else "MISSED"
    print(f"{'Ray overhead: job at batch_size 1 against the loop':<58} {overhead * 100:>9.1f} %   <= 15 % {verdict}")
    print(f"{'job at the default batch_size against the loop':<58} {one['job_rate'] / loop:>10.2f}x")
    scaling = two["job_rate"] / one["job_rate"]
    print(f"{'2 actors against 1 (job, one thread each)':<58} {scaling:>10.2f}x   >= 1.6x {'met' if scaling >= 1.6 else 'MISSED'}")
    growth = large["peak"] / one["peak"]
    peaks = f"{one['peak'] / 2**20:>6.0f} / {large['peak'] / 2**20:.0f} MiB  ({growth:.2f}x)"
    print(f"{'peak RSS of the process tree: N / 2N images':<58} {peaks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
