"""Serving benchmark, side by side in one run (tiny preset, 1 step unless said, 127.0.0.1 only, bounded in count/time).

1. Serve overhead: p50 of the HTTP round trip (POST /v1/restore, 64x64 PNG, prompt given, auth on) minus p50 of a
   direct `Restorer.restore` on the same input in this process (goal <= 10 ms).
2. Batching gain: images per second of `Restorer.restore_batch` with 4 images against 4 single `restore` calls, at the
   tiny preset's native size (64 px; goal >= 1.5x) and at larger sizes (compute-bound on CPU: reported, no goal).
3. Latency under 16 concurrent clients for --seconds: p50 / p99 and throughput through Serve.

    python bench/serving.py [--requests 60] [--seconds 20] [--batch-wait 0.01]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def png(size: int, seed: int = 0) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def direct(requests_count: int) -> dict:
    """In this process, one thread (as a replica with a fractional CPU gets)."""
    import torch
    from PIL import Image

    from restoration.restorer import Restorer
    from restoration.settings import SamplerConfig

    torch.set_num_threads(1)
    restorer = Restorer("tiny")
    image = Image.open(io.BytesIO(png(64))).convert("RGB")
    one_step = SamplerConfig(steps=1)
    for _ in range(3):
        restorer.restore(image, prompt="a photo", sampler=one_step)
    times = []
    for _ in range(requests_count):
        started = time.perf_counter()
        restorer.restore(image, prompt="a photo", sampler=one_step)
        times.append(time.perf_counter() - started)
    batching = {}
    for size in (64, 256, 512):
        images = [Image.open(io.BytesIO(png(size, seed))).convert("RGB") for seed in range(4)]
        sampler = SamplerConfig(steps=4)
        restorer.restore_batch(images, ["a photo"] * 4, sampler)  # warm
        rounds = 5 if size == 64 else 2
        started = time.perf_counter()
        for _ in range(rounds):
            for picture in images:
                restorer.restore(picture, prompt="a photo", sampler=sampler)
        single = 4 * rounds / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(rounds):
            restorer.restore_batch(images, ["a photo"] * 4, sampler)
        batched = 4 * rounds / (time.perf_counter() - started)
        batching[size] = (single, batched)
    return {"p50": float(np.median(times)), "batching": batching}


def through_serve(requests_count: int, seconds: float, batch_wait: float) -> dict:
    import requests
    import torch
    from ray import serve

    from restoray.config import load_config
    from restoray.ray_env import connect
    from restoray.serve import app_config, free_port, start_service

    torch.set_num_threads(1)
    os.environ["RESTORAY_SERVE_TOKENS"] = "bench-token"
    config = load_config(None, ["sampler.steps=1", f"serve.batch_wait_timeout_s={batch_wait}", "serve.restorer.max_queued_requests=128"])
    app = app_config(config, port=free_port())
    connect(config.ray)
    service = start_service(config, app)
    headers = {"Authorization": "Bearer bench-token"}
    body = png(64)
    try:
        session = requests.Session()

        def one(seed: int = 0) -> float:
            started = time.perf_counter()
            response = session.post(
                f"{service.url}/v1/restore",
                files={"image": ("a.png", body, "image/png")},
                data={"prompt": "a photo", "steps": "1", "seed": str(seed)},
                headers=headers,
                timeout=120,
            )
            assert response.status_code == 200, response.text
            return time.perf_counter() - started

        for _ in range(5):
            one()
        sequential = [one() for _ in range(requests_count)]
        latencies, lock = [], threading.Lock()
        stop_at = time.monotonic() + seconds

        def client(index: int) -> None:
            own = requests.Session()
            count = 0
            while time.monotonic() < stop_at and count < 2000:
                started = time.perf_counter()
                response = own.post(
                    f"{service.url}/v1/restore",
                    files={"image": ("a.png", body, "image/png")},
                    data={"prompt": "a photo", "steps": "1", "seed": str(index * 10000 + count)},
                    headers=headers,
                    timeout=120,
                )
                with lock:
                    latencies.append((time.perf_counter() - started, response.status_code))
                count += 1

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        took = time.monotonic() - started
    finally:
        service.stop()
        serve.shutdown()
    seconds_only = [latency for latency, _ in latencies]
    return {
        "p50": float(np.median(sequential)),
        "load_p50": float(np.percentile(seconds_only, 50)),
        "load_p99": float(np.percentile(seconds_only, 99)),
        "load_rate": len(latencies) / took,
        "load_count": len(latencies),
        "load_errors": sum(status != 200 for _, status in latencies),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60, help="sequential requests for the overhead p50s")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of the 16-client load")
    parser.add_argument("--batch-wait", type=float, default=0.01, help="serve.batch_wait_timeout_s of the served app")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    local = direct(args.requests)
    served = through_serve(args.requests, args.seconds, args.batch_wait)
    overhead_ms = (served["p50"] - local["p50"]) * 1000
    print(f"\nserving bench (tiny preset, 64x64 PNG, 1 step, batch wait {args.batch_wait * 1000:g} ms)")
    print(f"{'measure':<44} {'value':>12}  goal")
    print(f"{'direct Restorer.restore p50':<44} {local['p50'] * 1000:>9.1f} ms")
    print(f"{'HTTP POST /v1/restore p50 (sequential)':<44} {served['p50'] * 1000:>9.1f} ms")
    print(f"{'Serve overhead (difference of p50s)':<44} {overhead_ms:>9.1f} ms  <= 10 ms {'met' if overhead_ms <= 10 else 'MISSED'}")
    for size, (single, batched) in local["batching"].items():
        gain = batched / single
        goal = f">= 1.5x {'met' if gain >= 1.5 else 'MISSED'}" if size == 64 else "(compute-bound on CPU; no goal)"
        label = f"batch 4 vs 1 at {size}px, 4 steps ({single:.1f} -> {batched:.1f} img/s)"
        print(f"{label:<44} {gain:>10.2f}x  {goal}")
    print(f"{'16 clients: p50 / p99':<44} {served['load_p50'] * 1000:>6.0f} / {served['load_p99'] * 1000:.0f} ms")
    count, errors = served["load_count"], served["load_errors"]
    print(f"{'16 clients: throughput':<44} {served['load_rate']:>8.1f} req/s  ({count} requests, {errors} not 200)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
