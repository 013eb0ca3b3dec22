"""Seconds per sampling step on CPU with the tiny preset: plain, restoration-guided, ReFIR with one reference
(refir_cfg paired and shared).

    python bench/sampling.py [--steps 6] [--size 512]

Every row uses the same Restorer, image, prompt and seed in one run; printed: the sampling phase's s/step and the whole
restore's seconds, each with its ratio to the restoration-guided row (no reference). The default 512 px is a
64 x 64 latent (tiling off). Goals: paired <= 2.0x
(the released ReFIR costs 2.2x), shared <= 1.5x. The reference chain restores the reference through the same
adapted model on its own trajectory: paired runs it on both CFG passes (2 model calls -> 4), shared on the
conditional pass only (2 -> 3), plus one attention into the reference per injected layer and one gate per decoder
position; the VAE, prompt encoding and colour fix are shared, and the reference's stage 1 is one more encode/decode.
(GPU numbers at SDXL size need a session lent a device.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import skimage.data
    import torch
    from PIL import Image

    from restoration.restorer import Restorer
    from restoration.sampling.edm import SamplerConfig
    from restoration.settings import RestoreConfig

    torch.set_num_threads(1)
    restorer = Restorer.from_pretrained("tiny")
    photo = Image.fromarray(skimage.data.astronaut()).resize((args.size, args.size))
    reference = Image.fromarray(skimage.data.coffee()).resize((args.size, args.size))
    rows = {
        "plain (no guidance)": {"sampler": SamplerConfig(steps=args.steps, tau_r=None)},
        "restoration-guided": {"sampler": SamplerConfig(steps=args.steps, tau_r=4.0)},
        "ReFIR paired": {
            "sampler": SamplerConfig(steps=args.steps, tau_r=4.0),
            "references": (reference,),
            "options": RestoreConfig(refir_cfg="paired", tile_latent=None),
        },
        "ReFIR shared": {
            "sampler": SamplerConfig(steps=args.steps, tau_r=4.0),
            "references": (reference,),
            "options": RestoreConfig(refir_cfg="shared", tile_latent=None),
        },
    }
    for options in rows.values():
        options.setdefault("options", RestoreConfig(tile_latent=None))
    restorer.restore(photo, prompt="a photo", sampler=SamplerConfig(steps=1), seed=0)  # warm up
    timings, totals = {}, {}
    for name, options in rows.items():
        best = best_total = float("inf")
        for _ in range(args.repeats):
            result = restorer.restore(photo, prompt="a photo", seed=0, **options)
            best = min(best, result.seconds["sampling"])
            best_total = min(best_total, result.seconds["total"])
        timings[name], totals[name] = best / args.steps, best_total
    base = timings["restoration-guided"]
    latent = args.size // restorer.vae_factor
    print(f"tiny preset, {args.size}x{args.size} ({latent}x{latent} latent), {args.steps} supir steps (two passes each), one thread\n")
    print(f"{'pipeline':<26}{'sampling s/step':>16}{'ratio':>8}{'whole restore s':>17}{'ratio':>8}")
    for name, seconds in timings.items():
        total = totals[name]
        print(f"{name:<26}{seconds:>16.4f}{seconds / base:>8.2f}{total:>17.2f}{total / totals['restoration-guided']:>8.2f}")
    print(f"\nReFIR paired / no reference: {timings['ReFIR paired'] / base:.2f}x (goal <= 2.0)")
    print(f"ReFIR shared / no reference: {timings['ReFIR shared'] / base:.2f}x (goal <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
