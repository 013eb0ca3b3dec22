"""Degradation throughput on one core, against the codec floor, measured side by side in one run.

    python bench/degradations.py [--seconds 2] [--sizes 512 1024]

Pins itself to one core (sched_setaffinity, OMP_NUM_THREADS=1, cv2.setNumThreads(1)). Inputs are the bundled
sample photos, centre-cropped and resized to each size, stored as JPEG q95 bytes. Per image:
- floor: JPEG decode + JPEG q95 encode (the least any stage that touches pixels costs);
- each chain: decode + degrade + encode the LQ as JPEG q95 (and the mask as PNG where there is one);
- `realesrgan (plain)`: the same chain with the straightforward implementations (full-kernel `cv2.filter2D`,
  `numpy` normals, `numpy.random.poisson`), the baseline the fast ops replace;
- `realesrgan, USM per source`: two variants of each source sharing the USM-sharpened HQ (computed once, as the
  build's degrade stage does), per sample.
Printed: images/s and the ratio to the floor's throughput (goal for realesrgan at 512, with BasicSR's USM and
fresh noise per sample: >= 1/8).

Where the time goes (Real-ESRGAN at 512, one core, this machine; see the profile the script prints):
the first-order blur at full resolution dominates. `cv2.filter2D` takes its DFT path from ~11x11 kernels
(~12 ms for a 512x512 RGB float image); we crop negligible border weights and split the kernel by SVD into the
fewest separable terms within a 0.4-grey-level error bound, filtering uint8 input in int16 fixed point (an
isotropic Gaussian is one ~1 ms pass, a rotated anisotropic or plateau kernel 4-12 passes). BasicSR's USM
(two 51x51 float Gaussian blurs, sigma 8) is the largest fixed cost: OpenCV's separable float path, the
arithmetic around it in OpenCV calls. Fresh normals per sample come from torch's sampler seeded by the sample's
generator (about 3x numpy's). Poisson noise uses the normal approximation with the exact variance. JPEG round
trips (float quality: PIL with the IJG tables scaled by the float factor) and the input decode are the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np

from restoration.degradations import (
    composite_degrade,
    negative_degrade,
    ops,
    parameterized_degrade,
    realesrgan_degrade,
    single_degrade,
)
from restoration.degradations.realesrgan import usm_source
from restoration.images import decode_image, encode_jpeg, encode_png
from restoray.samples import list_samples


def pin_to_one_core() -> int:
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    cv2.setNumThreads(1)
    return core


def inputs(size: int) -> list[bytes]:
    encoded = []
    for sample in list_samples():
        image = sample.load()
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = cv2.resize(image[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_AREA)
        encoded.append(encode_jpeg(square, 95))
    return encoded


def throughput(step, images: list[bytes], seconds: float) -> float:
    rng = np.random.default_rng(0)
    for data in images[:2]:
        step(data, rng)  # warm caches (kernel SVDs, noise table)
    count, started = 0, time.perf_counter()
    while True:
        for data in images:
            count += step(data, rng) or 1  # a step may make several samples
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return count / elapsed


def floor_step(data: bytes, rng) -> None:
    encode_jpeg(decode_image(data), 95)


def chain_step(chain):
    def step(data: bytes, rng) -> None:
        sample = chain(decode_image(data), rng)
        encode_jpeg(sample.lq, 95)
        if sample.mask is not None:
            encode_png(np.repeat(sample.mask[..., None], 3, axis=2))

    return step


def shared_usm_step(data: bytes, rng) -> int:
    hq = decode_image(data)
    sharpened = usm_source(hq)
    for _ in range(2):
        encode_jpeg(realesrgan_degrade(hq, rng, sharpened=sharpened).lq, 95)
    return 2


@contextlib.contextmanager
def plain_implementations():
    """Swap the fast ops for the straightforward ones the tests compare them against."""
    from restoration.degradations import kernels

    saved = (ops.blur, ops._standard_normal, ops.poisson_noise)
    ops.blur = kernels.apply_kernel_reference
    ops._standard_normal = lambda rng, shape: rng.standard_normal(shape, dtype=np.float32)
    ops.poisson_noise = ops.poisson_noise_reference
    try:
        yield
    finally:
        ops.blur, ops._standard_normal, ops.poisson_noise = saved


SINGLE_TYPES = ("noise", "blur", "jpeg", "downsample", "rain", "haze", "low_light")
CHAINS = {
    "realesrgan": realesrgan_degrade,
    "parameterized": parameterized_degrade,
    "composite": composite_degrade,
    "single (a random type each)": lambda hq, rng: single_degrade(hq, rng, SINGLE_TYPES[int(rng.integers(len(SINGLE_TYPES)))]),
    "degraded_negative": negative_degrade,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per row")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profile of realesrgan at the first size")
    args = parser.parse_args(argv)
    core = pin_to_one_core()
    print(f"one core (cpu {core}), OMP_NUM_THREADS=1, cv2 threads {cv2.getNumThreads()}, {args.seconds:.1f}s per row\n")
    print(f"{'size':>6}  {'pipeline':<28} {'images/s':>9}  {'ratio to floor':>14}")
    for size in args.sizes:
        images = inputs(size)
        floor = throughput(floor_step, images, args.seconds)
        print(f"{size:>6}  {'floor: decode + encode q95':<28} {floor:>9.1f}  {'1':>14}")
        for name, chain in CHAINS.items():
            rate = throughput(chain_step(chain), images, args.seconds)
            print(f"{size:>6}  {name:<28} {rate:>9.1f}  {f'1/{floor / rate:.1f}':>14}")
            if name == "realesrgan":
                with plain_implementations():
                    plain = throughput(chain_step(chain), images, args.seconds)
                ratio = f"1/{floor / plain:.1f}"
                print(f"{size:>6}  {'realesrgan (plain)':<28} {plain:>9.1f}  {ratio:>14}   (fast/plain: {rate / plain:.1f}x)")
                shared = throughput(shared_usm_step, images, args.seconds)
                print(
                    f"{size:>6}  {'realesrgan, USM per source':<28} {shared:>9.1f}  {f'1/{floor / shared:.1f}':>14}   (2 variants a source)"
                )
    if args.profile:
        images = inputs(args.sizes[0])
        profiler = cProfile.Profile()
        rng = np.random.default_rng(1)
        step = chain_step(realesrgan_degrade)
        profiler.enable()
        for _ in range(5):
            for data in images:
                step(data, rng)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(10)
        print(f"\nwhere realesrgan's time goes at {args.sizes[0]} (cProfile, tottime):")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[-1600:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
