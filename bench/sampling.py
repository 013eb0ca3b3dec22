"""Seconds per sampling step on CPU with the tiny preset: plain, restoration-guided, ReFIR with one reference.

    python bench/sampling.py [--steps 6] [--size 128]

All three rows use the same Restorer, image, prompt and seed in one run; printed: s/step and the ratio to the
plain row. Goal: ReFIR <= 1.6x the time of no reference (the paper's implementation costs 2.2x). The reference
chain is one extra UNet pass per model call (record keys/values), and the injected layers add one attention
into the reference, so the expected cost is a little under 2x of the UNet part alone; the VAE, captioner-free
prompt encoding and colour fix are shared. (GPU numbers at SDXL size need a session lent a device.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import skimage.data
    import torch
    from PIL import Image

    from restoration.restorer import Restorer
    from restoration.sampling.edm import SamplerConfig

    torch.set_num_threads(1)
    restorer = Restorer.from_pretrained("tiny")
    photo = Image.fromarray(skimage.data.astronaut()).resize((args.size, args.size))
    reference = Image.fromarray(skimage.data.coffee()).resize((args.size, args.size))
    rows = {
        "plain (no guidance)": {"sampler": SamplerConfig(steps=args.steps, tau_r=None)},
        "restoration-guided": {"sampler": SamplerConfig(steps=args.steps, tau_r=4.0)},
        "ReFIR, one reference": {"sampler": SamplerConfig(steps=args.steps, tau_r=4.0), "references": (reference,)},
    }
    restorer.restore(photo, prompt="a photo", sampler=SamplerConfig(steps=1), seed=0)  # warm up
    timings = {}
    for name, options in rows.items():
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            restorer.restore(photo, prompt="a photo", seed=0, **options)
            best = min(best, time.perf_counter() - started)
        timings[name] = best / args.steps
    base = timings["restoration-guided"]
    print(f"tiny preset, {args.size}x{args.size}, {args.steps} steps, cfg 7.5 (two model calls per step), one thread\n")
    print(f"{'pipeline':<26}{'s/step':>10}{'ratio':>8}")
    for name, seconds in timings.items():
        print(f"{name:<26}{seconds:>10.4f}{seconds / base:>8.2f}")
    print(f"\nReFIR / no reference: {timings['ReFIR, one reference'] / base:.2f}x (goal <= 1.6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
