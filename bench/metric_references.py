"""restoray's PSNR/SSIM conventions and FID beside the reference implementations themselves, on the same pairs.

    pip install --no-deps --target /tmp/pyiqa pyiqa==0.1.16      # PolyForm Noncommercial: never a restoray dependency
    python bench/metric_references.py --pyiqa /tmp/pyiqa [--inception /models/inception-2015-12-05.pt]
    python bench/metric_references.py [--clipiqa RN50.pt --musiq musiq_koniq_ckpt-e95806b9.pth --niqe niqe_modelparameters.mat]

Without --pyiqa, the pyiqa installed beside restoray (`make install` puts it there --no-deps, with openai-clip) is
used, and the learned no-reference metrics are compared too:

Pairs: the bundled sample photos (centre 256 x 256) and seeded Gaussian noise of sigma 3, 12 and 30 added to them;
one row per convention, metric and noise level, each the mean over the photos: restoray's value, the reference's and
the largest absolute difference of any single pair.

- pyiqa 0.1.16's own `PSNR`/`SSIM` modules (its defaults for `pyiqa`; `test_y_channel=True, color_space='ycbcr'`
  for `refir`), on float32 tensors / 255 as its loader gives them. Its `psnr_arch`/`ssim_arch` need only torch: they
  are imported from the installed package without running `pyiqa/__init__.py` (which imports every metric and its
  dependencies). The torch baseline of the old restoray SSIM (torchmetrics, unrounded Y, no clamp) is printed
  beside it for the difference the issue measured.
- PromptIR's `compute_psnr_ssim`: scikit-image's functions as PromptIR calls them (`promptir`).
- CLIP-IQA, MUSIQ, NIQE (installed pyiqa only): restoray's scorer on each decoded image against pyiqa's own metric
  reading the PNG file (its folder mode), with the given weights or tiny random stand-ins (the tests' files).
- FID: clean-fid's `compute_fid(dir_a, dir_b, mode="clean")` against restoray's per-image features + clean-fid's
  `fid_from_feats`, with `--inception` (NVIDIA's TorchScript file) or a random stand-in TorchScript network.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from restoration.evaluation.conventions import MetricConvention  # noqa: E402
from restoration.evaluation.metrics import psnr, ssim  # noqa: E402
from restoray.samples import list_samples  # noqa: E402


def load_pyiqa(target: Path):
    """pyiqa's psnr_arch and ssim_arch from an installed copy, its package __init__ files skipped."""
    sys.path.insert(0, str(target))
    root = target / "pyiqa"
    if not root.is_dir():
        raise SystemExit(f"--pyiqa {target}: no pyiqa package there (pip install --no-deps --target {target} pyiqa==0.1.16)")
    for name in ("pyiqa", "pyiqa.utils", "pyiqa.archs"):
        module = types.ModuleType(name)
        module.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = module
    from pyiqa.archs import psnr_arch, ssim_arch

    return psnr_arch, ssim_arch


def installed_pyiqa():
    from pyiqa.archs import psnr_arch, ssim_arch

    return psnr_arch, ssim_arch


def learned_rows(files: dict[str, Path | None], data: dict[float, list[tuple[np.ndarray, np.ndarray]]]) -> list[str]:
    """restoray's pyiqa-backed scorers against pyiqa reading the same images from PNG files."""
    import pyiqa

    from restoration.evaluation.learned import build_scorer
    from tests.metric_weights import musiq_checkpoint, niqe_parameters, openai_clip_torchscript

    stand_ins = {"clipiqa": openai_clip_torchscript, "musiq": musiq_checkpoint, "niqe": niqe_parameters}
    suffix = {"clipiqa": ".pt", "musiq": ".pth", "niqe": ".mat"}
    lines = []
    with tempfile.TemporaryDirectory(prefix="bench-iqa-") as folder:
        folder = Path(folder)
        for name, given in files.items():
            path = given or stand_ins[name](folder / f"{name}{suffix[name]}")
            option = {"backbone": str(path)} if name == "clipiqa" else {"pretrained_model_path": str(path)}
            ours_scorer, theirs_metric = build_scorer(name, path), pyiqa.create_metric(name, device="cpu", **option)
            label = name if given else f"{name}*"
            for sigma, images in data.items():
                ours, theirs = [], []
                for index, (output, _) in enumerate(images):
                    file = folder / f"{sigma}-{index:03d}.png"
                    Image.fromarray(output).save(file)
                    ours.append(ours_scorer(output))
                    theirs.append(float(theirs_metric(str(file))))
                a, b = np.array(ours), np.array(theirs)
                lines.append(f"{'pyiqa':<10} {label:<8} {sigma:>6g} {a.mean():>12.6f} {b.mean():>12.6f} {np.abs(a - b).max():>12.2e}")
    return lines


def pairs(sigmas: list[float]) -> dict[float, list[tuple[np.ndarray, np.ndarray]]]:
    photos = []
    for sample in list_samples():
        image = sample.load()
        top, left = (image.shape[0] - 256) // 2, (image.shape[1] - 256) // 2
        photos.append(np.ascontiguousarray(image[top : top + 256, left : left + 256]))
    rng = np.random.default_rng(0)
    return {sigma: [(np.clip(hq + rng.normal(0, sigma, hq.shape), 0, 255).astype(np.uint8), hq) for hq in photos] for sigma in sigmas}


def unit(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


def reference_scores(name: str, output: np.ndarray, hq: np.ndarray, psnr_arch, ssim_arch) -> tuple[float, float]:
    if name == "promptir":
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity

        a, b = (image.astype(np.float32) / 255.0 for image in (hq, output))
        return peak_signal_noise_ratio(a, b, data_range=1), structural_similarity(a, b, data_range=1, channel_axis=-1)
    options = {"test_y_channel": True, "color_space": "ycbcr"} if name == "refir" else {}
    psnr_module = psnr_arch.PSNR(test_y_channel=name == "refir", **({"color_space": "ycbcr"} if name == "refir" else {}))
    ssim_module = ssim_arch.SSIM(**options)
    with torch.no_grad():
        return float(psnr_module(unit(output), unit(hq))), float(ssim_module(unit(output), unit(hq)))


def old_ssim(output: np.ndarray, hq: np.ndarray) -> float:
    """restoray's SSIM before the conventions: torchmetrics' map on the unrounded studio-range Y, valid region."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    def y(image):
        return torch.from_numpy(image.astype(np.float64) / 255.0 @ np.array([65.481, 128.553, 24.966]) + 16.0)[None, None]

    _, full = structural_similarity_index_measure(
        y(output), y(hq), gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=255.0, return_full_image=True
    )
    return float(full[..., 5:-5, 5:-5].mean())


def fid_rows(inception: Path | None, data: dict[float, list[tuple[np.ndarray, np.ndarray]]]) -> list[str]:
    from cleanfid import fid as cleanfid
    from cleanfid.inception_torchscript import InceptionV3W

    from restoration.evaluation.learned import FidFeatures, frechet_distance

    with tempfile.TemporaryDirectory(prefix="bench-fid-") as folder:
        folder = Path(folder)
        if inception is None:
            sys.path.insert(0, str(ROOT))
            from tests.metric_weights import inception_torchscript

            inception = inception_torchscript(folder / "inception")
        extractor = InceptionV3W(str(inception.parent), download=False)
        features = FidFeatures(inception)
        lines = []
        for sigma, images in data.items():
            sides = {"out": [output for output, _ in images], "hq": [hq for _, hq in images]}
            for side, pictures in sides.items():
                (folder / f"{sigma}-{side}").mkdir()
                for index, picture in enumerate(pictures):
                    Image.fromarray(picture).save(folder / f"{sigma}-{side}" / f"{index:03d}.png")
            options = {"mode": "clean", "custom_feat_extractor": extractor, "device": torch.device("cpu"), "num_workers": 0}
            reference = cleanfid.compute_fid(str(folder / f"{sigma}-out"), str(folder / f"{sigma}-hq"), verbose=False, **options)
            ours = frechet_distance(np.stack([features(p) for p in sides["out"]]), np.stack([features(p) for p in sides["hq"]]))
            lines.append(f"{'clean-fid':<10} {'fid':<8} {sigma:>6g} {ours:>12.6f} {reference:>12.6f} {abs(ours - reference):>12.2e}")
        return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyiqa", type=Path, default=None, help="a folder pyiqa 0.1.16 was installed into (--target)")
    for name, what in (("clipiqa", "OpenAI's RN50.pt"), ("musiq", "pyiqa's MUSIQ KonIQ checkpoint"), ("niqe", "NIQE's .mat")):
        parser.add_argument(f"--{name}", type=Path, default=None, help=f"{what} (default: a tiny random stand-in, marked *)")
    parser.add_argument("--inception", type=Path, default=None, help="NVIDIA's TorchScript InceptionV3 (default: a random stand-in)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[3.0, 12.0, 30.0])
    args = parser.parse_args()
    psnr_arch, ssim_arch = load_pyiqa(args.pyiqa) if args.pyiqa else installed_pyiqa()
    data = pairs(args.sigmas)
    print(f"{len(data[args.sigmas[0]])} sample photos, 256 x 256 centre crops, Gaussian noise per sigma (seed 0)")
    print(f"{'convention':<10} {'metric':<8} {'sigma':>6} {'restoray':>12} {'reference':>12} {'max |diff|':>12}")
    for name in ("pyiqa", "refir", "promptir"):
        convention = MetricConvention(name)
        for sigma, images in data.items():
            ours = [(psnr(out, hq, convention), ssim(out, hq, convention)) for out, hq in images]
            theirs = [reference_scores(name, out, hq, psnr_arch, ssim_arch) for out, hq in images]
            for column, metric in enumerate(("psnr", "ssim")):
                a, b = np.array([o[column] for o in ours]), np.array([t[column] for t in theirs])
                print(f"{name:<10} {metric:<8} {sigma:>6g} {a.mean():>12.6f} {b.mean():>12.6f} {np.abs(a - b).max():>12.2e}")
    for sigma, images in data.items():  # the departure the issue measured: the old SSIM against pyiqa's on ycbcr Y
        old = np.array([old_ssim(out, hq) for out, hq in images])
        theirs = np.array([reference_scores("refir", out, hq, psnr_arch, ssim_arch)[1] for out, hq in images])
        print(f"{'old':<10} {'ssim':<8} {sigma:>6g} {old.mean():>12.6f} {theirs.mean():>12.6f} {np.abs(old - theirs).max():>12.2e}")
    if args.pyiqa is None:
        for line in learned_rows({"clipiqa": args.clipiqa, "musiq": args.musiq, "niqe": args.niqe}, data):
            print(line)
    for line in fid_rows(args.inception, data):
        print(line)


if __name__ == "__main__":
    main()
