"""Dataset-build throughput on Ray Data: scaling from one core to two, Ray overhead, memory against corpus size.

    python bench/build_dataset.py [--inputs 500] [--large 2000]

Inputs: synthetic 1024x1024 JPEGs (q95) made from the bundled photos by random crops, flips and colour jitter.
Build: 512x512 crops, 2 variants each (the default kind mix), JPEG-encoded samples; dedup, blur filter and model
stages off, as the issue's bench asks. Each run is a fresh process whose whole Ray instance is pinned with
`taskset` (one core, then two) and started with that many CPUs. Printed, in one run:
- rows/s (samples written / wall time of the build) on 1 and 2 cores, and the scaling; each process first
  builds a 16-image warm-up corpus so that worker start-up and module imports (several seconds, paid once per
  worker process) are reported apart from the steady-state rate;
- the degrade stage's rows/s per busy core inside Ray, against the same DegradeStage called in this process
  without Ray on the same crops (Ray overhead = 1 - ratio);
- peak RSS of the driver and of all Ray worker processes, for `--inputs` and `--large` inputs (flat = streaming).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_corpus(directory: Path, count: int, size: int = 1024) -> None:
    import cv2
    import numpy as np

    from restoration.images import encode_jpeg
    from restoray.samples import list_samples

    directory.mkdir(parents=True, exist_ok=True)
    existing = len(list(directory.glob("*.jpg")))
    photos = [s.load() for s in list_samples()]
    rng = np.random.default_rng(0)
    for index in range(existing, count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        side = int(min(height, width) * rng.uniform(0.6, 1.0))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = cv2.resize(photo[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_CUBIC)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        jitter = rng.uniform(0.85, 1.15, size=3)
        crop = np.clip(crop.astype(np.float32) * jitter, 0, 255).astype(np.uint8)
        (directory / f"{index:05d}.jpg").write_bytes(encode_jpeg(np.ascontiguousarray(crop), 95))


def bench_config():
    from pipelines.config import DataBuildConfig

    return DataBuildConfig.model_validate(
        {
            "quality": {"min_short_side": 512, "min_sharpness": None, "min_jpeg_quality": None},
            "dedup": {"exact": False, "perceptual": False},
            "embed": {"enabled": False},
            "crop": {"size": 512},
            "degrade": {"variants": 2, "image_format": "jpeg"},
            "write": {"max_rows_per_shard": 500},
        }
    )


def peak_memory(stop: threading.Event, result: dict) -> None:
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        workers = 0
        for process in psutil.process_iter(["cmdline", "memory_info"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if "ray::" in cmdline or "default_worker.py" in cmdline:
                workers += process.info["memory_info"].rss if process.info["memory_info"] else 0
        result["driver"] = max(result.get("driver", 0), me.memory_info().rss)
        result["workers"] = max(result.get("workers", 0), workers)
        time.sleep(0.2)


def run_one(corpus: str, output: str, cpus: int) -> dict:
    """In a process pinned by taskset: start Ray with `cpus` CPUs, warm up on a small corpus (worker processes
    start and import their modules once), then time the build of the real one."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["OMP_NUM_THREADS"] = "1"
    import ray

    from pipelines.build_dataset import build_dataset

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    warmup_started = time.perf_counter()
    build_dataset(str(Path(corpus).parent / "corpus-warmup"), f"{output}-warmup", bench_config(), "tiny")
    warmup = time.perf_counter() - warmup_started
    memory: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=peak_memory, args=(stop, memory), daemon=True)
    watcher.start()
    started = time.perf_counter()
    summary = build_dataset(corpus, output, bench_config(), "tiny")
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    ray.shutdown()
    return {
        "samples": summary.samples_written,
        "wall": wall,
        "warmup": warmup,
        "degrade_rows_per_core": summary.stage_rows_per_second.get("degrade", 0.0),
        "driver_mb": memory.get("driver", 0) / 2**20,
        "workers_mb": memory.get("workers", 0) / 2**20,
    }


def in_process_degrade_rate(corpus: Path, count: int) -> float:
    """The same DegradeStage on the same 512 crops, called directly in one process pinned to one core."""
    from pipelines.rows import batch_of, set_image, set_quality
    from pipelines.stages.crop import crop_row
    from pipelines.stages.degrade import DegradeStage
    from restoration.images import decode_image

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    config = bench_config()
    rows = []
    for path in sorted(corpus.glob("*.jpg"))[:count]:
        row = {"source": str(path), "caption": "", "quality": None}
        set_image(row, decode_image(path.read_bytes()))
        set_quality(row, sha256=path.name)
        rows.append(crop_row(row, config.crop, config.seed))
    stage = DegradeStage(config.degrade, config.seed, timer=None)
    batches = [batch_of(rows[i : i + 4]) for i in range(0, len(rows), 4)]
    started = time.perf_counter()
    produced = sum(len(stage(batch)["id"]) for batch in batches)
    return produced / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=500)
    parser.add_argument("--large", type=int, default=2000, help="corpus size for the memory comparison (0 to skip)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "restoray-bench-build"))
    parser.add_argument("--run-one", nargs=3, metavar=("CORPUS", "OUTPUT", "CPUS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        print(json.dumps(run_one(args.run_one[0], args.run_one[1], int(args.run_one[2]))))
        return 0

    workdir = Path(args.workdir)
    sizes = [args.inputs] + ([args.large] if args.large else [])
    for size in sizes:
        make_corpus(workdir / f"corpus-{size}", size)
    make_corpus(workdir / "corpus-warmup", 8 * 2)

    def launch(size: int, cores: str, cpus: int) -> dict:
        output = workdir / f"out-{size}-{cpus}-{time.time_ns()}"
        command = ["taskset", "-c", cores, sys.executable, __file__, "--run-one", str(workdir / f"corpus-{size}"), str(output), str(cpus)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
        subprocess.run(["rm", "-rf", str(output), f"{output}-warmup"], check=False)
        return json.loads(done.stdout.strip().splitlines()[-1])

    one = launch(args.inputs, "0", 1)
    two = launch(args.inputs, "0,1", 2)
    direct = in_process_degrade_rate(workdir / f"corpus-{args.inputs}", 100)
    print(f"{args.inputs} inputs at 1024x1024 -> 512x512 crops, 2 variants each (JPEG), dedup/blur/model stages off\n")
    columns = f"{'warm-up s':>10}{'samples':>8}{'wall s':>8}{'rows/s':>8}{'degrade rows/s/core':>21}{'driver MB':>11}{'workers MB':>12}"
    print(f"{'run':<26}{columns}")
    for name, run in (("1 core (taskset -c 0)", one), ("2 cores (taskset -c 0,1)", two)):
        rate = run["samples"] / run["wall"]
        print(
            f"{name:<26}{run['warmup']:>10.1f}{run['samples']:>8}{run['wall']:>8.1f}{rate:>8.1f}"
            f"{run['degrade_rows_per_core']:>21.1f}{run['driver_mb']:>11.0f}{run['workers_mb']:>12.0f}"
        )
    scaling = (two["samples"] / two["wall"]) / (one["samples"] / one["wall"])
    overhead = one["degrade_rows_per_core"] / direct
    print(f"\nscaling 1 -> 2 cores: {scaling:.2f}x (goal >= 1.7)")
    in_ray = one["degrade_rows_per_core"]
    print(f"degrade stage in Ray / same stage in one process without Ray: {in_ray:.1f} / {direct:.1f} = {overhead:.2f} (goal >= 0.8)")
    if args.large:
        large = launch(args.large, "0,1", 2)
        print(
            f"peak memory, 2 cores, {args.inputs} vs {args.large} inputs: driver {two['driver_mb']:.0f} vs {large['driver_mb']:.0f} MB, "
            f"workers {two['workers_mb']:.0f} vs {large['workers_mb']:.0f} MB "
            f"(ratio {large['workers_mb'] / max(two['workers_mb'], 1):.2f}; flat = streaming)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
