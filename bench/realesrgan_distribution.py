"""Real-ESRGAN's LQ statistics: restoray's chain against BasicSR's second-order degradation, independent draws on the
same crops, with the two-sample tests' p-values.

    OMP_NUM_THREADS=1 python bench/realesrgan_distribution.py [--draws 3000] [--workers 2] [--crop 256]

BasicSR (at 8d56e3a: RealESRGANModel.feed_data, realesrgan_dataset's kernels, degradations' *_pt noise with
clip=True, utils.diffjpeg.DiffJPEG, USMSharp, filter2D) is re-expressed below in numpy/torch from its facts, CPU,
one image at a time; its draws use Python's, numpy's and torch's global generators as BasicSR does, seeded per draw.
Each draw takes one seeded crop of the bundled sample photos (the same crop on both sides, other random draws) and
measures the LQ's PSNR against the USM-sharpened target after a bicubic upsampling back (OpenCV). Printed: median and
mean of each side, and two-sample KS and Mann-Whitney p-values on the PSNRs and on the PSNRs less a per-crop baseline
(a plain x4 area-down / bicubic-up of the target; the crop's content spreads PSNR by about 3.7 dB, which a plain KS
test cannot see a 0.1 dB shift through, while the residuals are still independent draws). A null row compares two
independent restoray runs.

What the stage-by-stage replay of the same draws found (before this version): the noise was not clipped, JPEG was a
codec round trip (edge-repeating padding, smooth chroma) where DiffJPEG pads with zeros and upsamples chroma by nearest
neighbour (-0.08 dB), and the first-order resize read pixels at OpenCV's in/out ratio where F.interpolate(scale_factor)
reads them at 1/scale (-0.04 dB). Blur, the USM source, the stage-2 and final resizes, Gaussian noise and the Poisson
approximation were each within 0.003 dB.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import special

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from restoration.jpeg_tables import IJG_CHROMA, IJG_LUMA


def to_t(image_hwc: np.ndarray) -> torch.Tensor:
    """HWC uint8 or float [0,1] -> 1x3xHxW float32."""
    if image_hwc.dtype == np.uint8:
        image_hwc = image_hwc.astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(image_hwc, dtype=np.float32)).permute(2, 0, 1)[None].contiguous()


def to_np(tensor: torch.Tensor) -> np.ndarray:
    return tensor[0].permute(1, 2, 0).contiguous().numpy()


# ----------------------------------------------------------------------------------------- filter2D / USM


def filter2D(img: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """basicsr.utils.img_process_util.filter2D (reflect pad, correlation), one kernel for the batch: OpenCV's
    filter2D with BORDER_REFLECT_101 (torch's 'reflect') computes the same, faster on CPU."""
    k = np.asarray(kernel, dtype=np.float32)
    return torch.from_numpy(np.stack([cv2.filter2D(p, cv2.CV_32F, k, borderType=cv2.BORDER_REFLECT_101) for p in img[0].numpy()]))[None]


def usm_sharp(img: torch.Tensor, weight=0.5, threshold=10) -> torch.Tensor:
    """basicsr USMSharp(radius=50): a 51 x 51 Gaussian from cv2.getGaussianKernel(51, 0) (separable: one pass each way)."""
    k1 = cv2.getGaussianKernel(51, 0).astype(np.float32)

    def blur(t):
        return torch.from_numpy(
            np.stack([cv2.sepFilter2D(p, cv2.CV_32F, k1, k1, borderType=cv2.BORDER_REFLECT_101) for p in t[0].numpy()])
        )[None]

    residual = img - blur(img)
    soft_mask = blur((torch.abs(residual) * 255 > threshold).float())
    sharp = torch.clip(img + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


# ----------------------------------------------------------------------------------------- kernels (BasicSR)


def _mesh(k):
    ax = np.arange(-k // 2 + 1.0, k // 2 + 1.0)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], -1)


def _sigma_matrix(sx, sy, theta):
    D = np.array([[sx**2, 0], [0, sy**2]])
    U = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return U @ D @ U.T


def _quad(k, sx, sy, theta):
    grid = _mesh(k)
    inv = np.linalg.inv(_sigma_matrix(sx, sy, theta))
    return np.sum(np.dot(grid, inv) * grid, 2)


def circular_lowpass_kernel(cutoff, k, pad_to=0):
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = np.fromfunction(
            lambda x, y: (
                cutoff
                * special.j1(cutoff * np.sqrt((x - (k - 1) / 2) ** 2 + (y - (k - 1) / 2) ** 2))
                / (2 * np.pi * np.sqrt((x - (k - 1) / 2) ** 2 + (y - (k - 1) / 2) ** 2))
            ),
            [k, k],
        )
    kernel[(k - 1) // 2, (k - 1) // 2] = cutoff**2 / (4 * np.pi)
    kernel = kernel / np.sum(kernel)
    if pad_to > k:
        p = (pad_to - k) // 2
        kernel = np.pad(kernel, ((p, p), (p, p)))
    return kernel


KERNEL_LIST = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
KERNEL_PROB = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]


def random_mixed_kernel(k, sigma_range, betag=(0.5, 4), betap=(1, 2)):
    kind = random.choices(KERNEL_LIST, KERNEL_PROB)[0]
    iso = not kind.endswith("aniso")
    sx = np.random.uniform(*sigma_range)
    if iso:
        sy, theta = sx, 0
    else:
        sy = np.random.uniform(*sigma_range)
        theta = np.random.uniform(-math.pi, math.pi)
    q = _quad(k, sx, sy, theta)
    if kind.startswith("generalized") or kind.startswith("plateau"):
        rng_b = betag if kind.startswith("generalized") else betap
        beta = np.random.uniform(rng_b[0], 1) if np.random.uniform() < 0.5 else np.random.uniform(1, rng_b[1])
        kernel = np.exp(-0.5 * np.power(q, beta)) if kind.startswith("generalized") else 1 / (np.power(q, beta) + 1)
    else:
        kernel = np.exp(-0.5 * q)
    return kernel / kernel.sum()


KERNEL_RANGE = [2 * v + 1 for v in range(3, 11)]


def dataset_kernels():
    """realesrgan_dataset.__getitem__'s kernel1, kernel2, sinc_kernel (21x21 each)."""

    def one(sigma):
        k = random.choice(KERNEL_RANGE)
        if np.random.uniform() < 0.1:
            omega = np.random.uniform(np.pi / 3, np.pi) if k < 13 else np.random.uniform(np.pi / 5, np.pi)
            kernel = circular_lowpass_kernel(omega, k)
        else:
            kernel = random_mixed_kernel(k, sigma)
        p = (21 - k) // 2
        return np.pad(kernel, ((p, p), (p, p)))

    k1 = one((0.2, 3))
    k2 = one((0.2, 1.5))
    if np.random.uniform() < 0.8:
        k = random.choice(KERNEL_RANGE)
        sinc = circular_lowpass_kernel(np.random.uniform(np.pi / 3, np.pi), k, pad_to=21)
    else:
        sinc = np.zeros((21, 21))
        sinc[10, 10] = 1
    return k1.astype(np.float32), k2.astype(np.float32), sinc.astype(np.float32)


# ----------------------------------------------------------------------------------------- noise (BasicSR _pt)


def gaussian_noise_pt(img, sigma, gray, generator=None):
    """clip=True, rounds=False."""
    _, c, h, w = img.shape
    z = torch.randn((h, w, 1) if gray else (h, w, c), generator=generator)
    return torch.clamp(img + z.permute(2, 0, 1)[None] * sigma / 255.0, 0, 1)


def _rgb_to_gray(img):  # torchvision rgb_to_grayscale
    r, g, b = img.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def poisson_noise_pt(img, scale, gray, generator=None):
    """BasicSR generate_poisson_noise_pt, clip=True."""
    base = _rgb_to_gray(img) if gray else img
    base = torch.clamp((base * 255.0).round(), 0, 255) / 255.0
    vals = 2 ** np.ceil(np.log2(len(torch.unique(base))))
    noise = torch.poisson(base * vals, generator=generator) / vals - base
    if gray:
        noise = noise.expand_as(img)
    return torch.clamp(img + noise * scale, 0, 1)


# ----------------------------------------------------------------------------------------- DiffJPEG (BasicSR)

# DiffJPEG's tables are the IJG quality-50 ones transposed (indexed [vertical, horizontal] frequency).
_Y = torch.from_numpy(IJG_LUMA.reshape(8, 8).T.astype(np.float32).copy())
_C = torch.from_numpy(IJG_CHROMA.reshape(8, 8).T.astype(np.float32).copy())
_DCT = np.zeros((8, 8, 8, 8), dtype=np.float32)
_IDCT = np.zeros((8, 8, 8, 8), dtype=np.float32)
for x, y, u, v in itertools.product(range(8), repeat=4):
    _DCT[x, y, u, v] = np.cos((2 * x + 1) * u * np.pi / 16) * np.cos((2 * y + 1) * v * np.pi / 16)
    _IDCT[x, y, u, v] = np.cos((2 * u + 1) * x * np.pi / 16) * np.cos((2 * v + 1) * y * np.pi / 16)
_DCT, _IDCT = torch.from_numpy(_DCT), torch.from_numpy(_IDCT)
_ALPHA = np.array([1.0 / np.sqrt(2)] + [1] * 7)
_DCT_SCALE = torch.from_numpy(np.outer(_ALPHA, _ALPHA) * 0.25).float()
_IDCT_ALPHA = torch.from_numpy(np.outer(_ALPHA, _ALPHA)).float()
_RGB2YCC = torch.from_numpy(
    np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float32).T.copy()
)
_YCC2RGB = torch.from_numpy(np.array([[1.0, 0.0, 1.402], [1, -0.344136, -0.714136], [1, 1.772, 0]], dtype=np.float32).T.copy())


def quality_to_factor(q):
    return (5000.0 / q if q < 50 else 200.0 - q * 2) / 100.0


def _split(image):
    b, h, _ = image.shape
    return image.view(b, h // 8, 8, -1, 8).permute(0, 1, 3, 2, 4).contiguous().view(b, -1, 8, 8)


def _merge(patches, h, w):
    b = patches.shape[0]
    return patches.view(b, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).contiguous().view(b, h, w)


def diffjpeg(x: torch.Tensor, quality: float) -> torch.Tensor:
    """BasicSR DiffJPEG(differentiable=False) for one image."""
    factor = quality_to_factor(float(quality))
    h, w = x.shape[-2:]
    hp, wp = (16 - h % 16) % 16, (16 - w % 16) % 16
    x = F.pad(x, (0, wp, 0, hp), mode="constant", value=0)
    H, W = h + hp, w + wp
    img = (x * 255).permute(0, 2, 3, 1)
    ycc = torch.tensordot(img, _RGB2YCC, dims=1) + torch.tensor([0.0, 128.0, 128.0])
    ycc = ycc.view(img.shape)
    y = ycc[..., 0]
    c2 = ycc.permute(0, 3, 1, 2)
    cb = F.avg_pool2d(c2[:, 1:2], 2, 2, count_include_pad=False)[:, 0]
    cr = F.avg_pool2d(c2[:, 2:3], 2, 2, count_include_pad=False)[:, 0]
    ytab, ctab = _Y * factor, _C * factor
    out = {}
    for name, comp, tab, (hh, ww) in (("y", y, ytab, (H, W)), ("cb", cb, ctab, (H // 2, W // 2)), ("cr", cr, ctab, (H // 2, W // 2))):
        blocks = _split(comp) - 128
        coef = _DCT_SCALE * torch.tensordot(blocks, _DCT, dims=2)
        coef = torch.round(coef.float() / tab) * tab
        rec = 0.25 * torch.tensordot(coef * _IDCT_ALPHA, _IDCT, dims=2) + 128
        out[name] = _merge(rec, hh, ww)

    def rep(t):
        hh, ww = t.shape[1:3]
        return t.unsqueeze(-1).repeat(1, 1, 2, 2).view(-1, hh * 2, ww * 2)

    cb_u, cr_u = rep(out["cb"]), rep(out["cr"])
    image = torch.stack([out["y"], cb_u, cr_u], dim=3)
    rgb = torch.tensordot(image + torch.tensor([0.0, -128.0, -128.0]), _YCC2RGB, dims=1).view(image.shape).permute(0, 3, 1, 2)
    rgb = torch.clamp(rgb, 0, 255) / 255
    return rgb[:, :, :h, :w]


# ----------------------------------------------------------------------------------------- the chain (feed_data)

OPT = dict(
    resize_prob=[0.2, 0.7, 0.1],
    resize_range=[0.15, 1.5],
    gaussian_noise_prob=0.5,
    noise_range=[1, 30],
    poisson_scale_range=[0.05, 3],
    gray_noise_prob=0.4,
    jpeg_range=[30, 95],
    second_blur_prob=0.8,
    resize_prob2=[0.3, 0.4, 0.3],
    resize_range2=[0.3, 1.2],
    gaussian_noise_prob2=0.5,
    noise_range2=[1, 25],
    poisson_scale_range2=[0.05, 2.5],
    gray_noise_prob2=0.4,
    jpeg_range2=[30, 95],
    scale=4,
)


def _noise(out, gaussian_prob, sigma_range, poisson_range, gray_prob, gen):
    # random_add_*_noise_pt draw sigma/scale then the gray flag with torch.rand
    if np.random.uniform() < gaussian_prob:
        sigma = float(torch.rand(1, generator=gen) * (sigma_range[1] - sigma_range[0]) + sigma_range[0])
        gray = bool(torch.rand(1, generator=gen) < gray_prob)
        return gaussian_noise_pt(out, sigma, gray, generator=gen)
    scale = float(torch.rand(1, generator=gen) * (poisson_range[1] - poisson_range[0]) + poisson_range[0])
    gray = bool(torch.rand(1, generator=gen) < gray_prob)
    return poisson_noise_pt(out, scale, gray, generator=gen)


def basicsr_degrade(gt_u8: np.ndarray, seed: int, jpeg=diffjpeg):
    """Independent draw: HxWx3 uint8 RGB gt -> (gt_usm float HWC, lq uint8 HWC at 1/4)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    gen = torch.Generator().manual_seed(seed)
    opt = OPT
    k1, k2, sinc = dataset_kernels()
    gt = to_t(gt_u8)
    gt_usm = usm_sharp(gt)
    ori_h, ori_w = gt.shape[2:4]
    out = filter2D(gt_usm, k1)
    up = random.choices(["up", "down", "keep"], opt["resize_prob"])[0]
    scale = (
        np.random.uniform(1, opt["resize_range"][1]) if up == "up" else np.random.uniform(opt["resize_range"][0], 1) if up == "down" else 1
    )
    mode = random.choice(["area", "bilinear", "bicubic"])
    out = F.interpolate(out, scale_factor=scale, mode=mode)
    out = _noise(out, opt["gaussian_noise_prob"], opt["noise_range"], opt["poisson_scale_range"], opt["gray_noise_prob"], gen)
    q = float(torch.rand(1, generator=gen) * (opt["jpeg_range"][1] - opt["jpeg_range"][0]) + opt["jpeg_range"][0])
    out = jpeg(torch.clamp(out, 0, 1), q)
    if np.random.uniform() < opt["second_blur_prob"]:
        out = filter2D(out, k2)
    up = random.choices(["up", "down", "keep"], opt["resize_prob2"])[0]
    scale = (
        np.random.uniform(1, opt["resize_range2"][1])
        if up == "up"
        else np.random.uniform(opt["resize_range2"][0], 1)
        if up == "down"
        else 1
    )
    mode = random.choice(["area", "bilinear", "bicubic"])
    out = F.interpolate(out, size=(int(ori_h / opt["scale"] * scale), int(ori_w / opt["scale"] * scale)), mode=mode)
    out = _noise(out, opt["gaussian_noise_prob2"], opt["noise_range2"], opt["poisson_scale_range2"], opt["gray_noise_prob2"], gen)
    if np.random.uniform() < 0.5:
        mode = random.choice(["area", "bilinear", "bicubic"])
        out = F.interpolate(out, size=(ori_h // opt["scale"], ori_w // opt["scale"]), mode=mode)
        out = filter2D(out, sinc)
        q = float(torch.rand(1, generator=gen) * (opt["jpeg_range2"][1] - opt["jpeg_range2"][0]) + opt["jpeg_range2"][0])
        out = jpeg(torch.clamp(out, 0, 1), q)
    else:
        q = float(torch.rand(1, generator=gen) * (opt["jpeg_range2"][1] - opt["jpeg_range2"][0]) + opt["jpeg_range2"][0])
        out = jpeg(torch.clamp(out, 0, 1), q)
        mode = random.choice(["area", "bilinear", "bicubic"])
        out = F.interpolate(out, size=(ori_h // opt["scale"], ori_w // opt["scale"]), mode=mode)
        out = filter2D(out, sinc)
    lq = torch.clamp((out * 255.0).round(), 0, 255) / 255.0
    return to_np(gt_usm), np.round(to_np(lq) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------- measures


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64) if a.dtype == np.uint8 else a.astype(np.float64) * 255
    b = b.astype(np.float64) if b.dtype == np.uint8 else b.astype(np.float64) * 255
    mse = np.mean((a - b) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def lq_psnr(lq_u8: np.ndarray, target: np.ndarray) -> float:
    """LQ bicubically upsampled back (cv2) vs the target (uint8 or float [0,1])."""
    h, w = target.shape[:2]
    up = cv2.resize(lq_u8, (w, h), interpolation=cv2.INTER_CUBIC)
    if target.dtype != np.uint8:
        target = np.clip(np.round(target * 255), 0, 255).astype(np.uint8)
    return psnr(up, target)


# ----------------------------------------------------------------------------------------- the measurement


def crops(count: int, size: int, seed: int = 1234) -> list[np.ndarray]:
    """`count` seeded size x size crops cycling over the bundled sample photos (reflect-101 padded when smaller, as
    BasicSR's dataset pads)."""
    from restoray.samples import list_samples

    images = [sample.load() for sample in list_samples()]
    rng = np.random.default_rng(seed)
    picked = []
    for index in range(count):
        image = images[index % len(images)]
        height, width = image.shape[:2]
        if height < size or width < size:
            image = cv2.copyMakeBorder(image, 0, max(0, size - height), 0, max(0, size - width), cv2.BORDER_REFLECT_101)
            height, width = image.shape[:2]
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        picked.append(np.ascontiguousarray(image[top : top + size, left : left + size]))
    return picked


def _draws(job: tuple[str, int, int, int]) -> list[float]:
    side, start, stop, size = job
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from restoration.degradations import realesrgan_degrade

    offset = {"basicsr": 50_000, "restoray": 10_000, "restoray (null)": 90_000}[side]
    values = []
    for index, hq in enumerate(crops(stop, size)[start:], start=start):
        if side == "basicsr":
            target, lq = basicsr_degrade(hq, offset + index)
        else:
            sample = realesrgan_degrade(hq, np.random.default_rng(offset + index))
            target, lq = sample.hq, sample.lq
        values.append(lq_psnr(lq, target))
    return values


def baseline(size: int, count: int) -> np.ndarray:
    """Per crop: the PSNR of its USM target after a plain INTER_AREA x4 down / bicubic up (the same on both sides)."""
    from restoration.degradations.realesrgan import usm_source

    values = []
    for hq in crops(count, size):
        target = usm_source(hq)
        height, width = target.shape[:2]
        values.append(lq_psnr(cv2.resize(target, (width // 4, height // 4), interpolation=cv2.INTER_AREA), target))
    return np.array(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=3000, help="draws per side")
    parser.add_argument("--workers", type=int, default=2, help="processes (one core each)")
    parser.add_argument("--crop", type=int, default=256)
    args = parser.parse_args()
    from scipy.stats import ks_2samp, mannwhitneyu

    chunk = max(1, args.draws // (4 * args.workers))
    sides = ("basicsr", "restoray", "restoray (null)")
    results = {}
    with ProcessPoolExecutor(args.workers) as pool:
        for side in sides:
            jobs = [(side, start, min(start + chunk, args.draws), args.crop) for start in range(0, args.draws, chunk)]
            results[side] = np.concatenate([np.array(part) for part in pool.map(_draws, jobs)])
    control = baseline(args.crop, args.draws)
    reference = results["basicsr"]
    print(f"{args.draws} draws per side on {args.crop}-px crops of the sample photos; LQ PSNR (bicubic back up) vs the USM target")
    print(
        f"{'side':<22}{'median':>9}{'mean':>9}{'d median':>10}{'d mean':>9}{'KS p':>10}{'MW p':>10}{'KS p (crop)':>13}{'MW p (crop)':>13}"
    )
    print(f"{'basicsr (re-expressed)':<22}{np.median(reference):>9.3f}{reference.mean():>9.3f}")
    for side, against in (("restoray", reference), ("restoray (null)", results["restoray"])):
        values = results[side]
        label = side if side == "restoray" else "restoray vs restoray"
        residual, against_residual = values - control, against - control
        tests = [ks_2samp(values, against), mannwhitneyu(values, against), ks_2samp(residual, against_residual)]
        tests.append(mannwhitneyu(residual, against_residual))
        print(
            f"{label:<22}{np.median(values):>9.3f}{values.mean():>9.3f}{np.median(values) - np.median(against):>+10.3f}"
            f"{values.mean() - against.mean():>+9.3f}{tests[0].pvalue:>10.3g}{tests[1].pvalue:>10.3g}"
            f"{tests[2].pvalue:>13.3g}{tests[3].pvalue:>13.3g}"
        )


if __name__ == "__main__":
    main()
