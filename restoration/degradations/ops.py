"""Degradation primitives on HxWx3 images: float32 in [0, 1], or uint8 where an op's output is 8-bit anyway.

Each op is deterministic given a `numpy.random.Generator` and the parameters it is called with; the chains draw
the parameters, call these, and record what was applied.

Speed notes (one core, 512x512): a blur goes through `kernels.apply_kernel` (cropped, low-rank separable);
noise is drawn fresh per sample as float32 standard normals (numpy's ziggurat, no float64 round trip); Poisson
noise uses the normal approximation with the Poisson variance (see `poisson_noise`); JPEG and bilinear/bicubic
resizing are OpenCV's, `area` is torch's.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from restoration.degradations.kernels import apply_kernel
from restoration.jpeg_tables import IJG_CHROMA, IJG_LUMA, ijg_tables

RESIZE_MODES = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


def to_float(image_u8: np.ndarray) -> np.ndarray:
    return image_u8.astype(np.float32) * np.float32(1.0 / 255.0)


def as_float(image: np.ndarray) -> np.ndarray:
    return to_float(image) if image.dtype == np.uint8 else image


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 with rounding (values outside are clipped)."""
    return cv2.convertScaleAbs(np.clip(image, 0.0, 1.0), alpha=255.0) if image.dtype != np.uint8 else image


def blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return apply_kernel(image, kernel)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Isotropic Gaussian blur; the kernel covers +-3 sigma (at least 3x3)."""
    if sigma <= 0:
        return image
    radius = max(1, int(np.ceil(3.0 * sigma)))
    return cv2.GaussianBlur(image, (2 * radius + 1, 2 * radius + 1), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def resize(image: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Resize to (height, width), keeping the dtype (uint8 or float32): bilinear/bicubic are OpenCV's, `area` is
    torch's (adaptive average pooling, enlarging included), as BasicSR's Real-ESRGAN pipeline uses it."""
    height, width = max(1, int(height)), max(1, int(width))
    if (height, width) == image.shape[:2]:
        return image
    if mode == "area":
        return area_resize(image, height, width)
    return cv2.resize(image, (width, height), interpolation=RESIZE_MODES[mode])


def area_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`torch.nn.functional.interpolate(mode="area")`: adaptive average pooling to (height, width)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(as_float(image))).permute(2, 0, 1)[None]
    resized = torch.nn.functional.adaptive_avg_pool2d(tensor, (height, width))[0].permute(1, 2, 0).numpy()
    return to_uint8(resized) if image.dtype == np.uint8 else resized


def _standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 N(0, 1) samples of `shape`, fresh for every sample: torch's sampler (about 3x numpy's) seeded from
    the caller's generator, so the noise still follows the sample's seed."""
    import torch

    generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    return torch.randn(shape, generator=generator, dtype=torch.float32).numpy()


def gaussian_noise(image: np.ndarray, sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise; `sigma` on the [0, 1] scale; gray noise is the same in every channel."""
    image = as_float(image)
    height, width, channels = image.shape
    noise = _standard_normal(rng, (height, width, 1) if gray else (height, width, channels))
    noise *= np.float32(sigma)
    return image + noise  # broadcasting spreads gray noise over the channels


def poisson_noise(image: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """BasicSR's Poisson noise: `(Poisson(img * vals) / vals - img) * scale`, vals = 2^ceil(log2(#grey levels)).

    Drawn as a normal with the Poisson variance img/vals (exact mean and variance; the skew at very dark pixels
    is dropped), which is ~10x cheaper than `numpy.random.poisson`. Gray noise is computed on the luma.
    """
    image = as_float(image)
    base = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None] if gray else image
    histogram = cv2.calcHist([to_uint8(base).reshape(-1, 1)], [0], None, [256], [0, 256])
    levels = int(np.count_nonzero(histogram))
    vals = float(2 ** np.ceil(np.log2(max(levels, 2))))
    std = np.sqrt(np.clip(base, 0.0, 1.0) * np.float32(1.0 / vals))
    noise = _standard_normal(rng, base.shape) * std * np.float32(scale)
    return image + noise


def poisson_noise_reference(image: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """The exact BasicSR formula with `numpy.random.poisson`, for tests and benchmarks."""
    base = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None] if gray else image
    base = np.clip(np.round(base * 255.0), 0, 255) / 255.0
    vals = float(2 ** np.ceil(np.log2(len(np.unique(base)))))
    out = rng.poisson(base * vals).astype(np.float32) / vals
    return image + (out - base).astype(np.float32) * np.float32(scale)


def jpeg(image: np.ndarray, quality: float) -> np.ndarray:
    """JPEG round trip at `quality`, 4:2:0 chroma; returns uint8. An integer quality uses the encoder's own scaling
    (OpenCV's libjpeg); a fractional one (BasicSR draws them) the IJG tables scaled by the float factor."""
    if float(quality) != int(quality):
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(to_uint8(image)).save(
            buffer, format="JPEG", qtables=[table.astype(int).tolist() for table in ijg_tables(float(quality))], subsampling=2
        )
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    # OpenCV encodes BGR; the swap matters because JPEG's luma weights R and B differently.
    pixels = cv2.cvtColor(to_uint8(image), cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buffer, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


# BasicSR's DiffJPEG (basicsr/utils/diffjpeg.py, differentiable=False), the JPEG of Real-ESRGAN's chain. It differs
# from a codec where the LQ's statistics show it (0.08 dB of LQ PSNR on 256-px crops, measured against a libjpeg
# round trip): it pads the image with zeros (black) to a multiple of 16, not by repeating the edge, and upsamples
# chroma by nearest neighbour, not libjpeg's smooth upsampling. Otherwise: BT.601 full-range YCbCr, 4:2:0 by 2 x 2
# means, the orthonormal 8 x 8 DCT, quantisation by the quality-50 IJG tables times the float factor (not rounded to
# integers), no 8-bit rounding in between. Its tables are the IJG ones transposed (indexed [vertical, horizontal]).
_DCT8 = np.array(
    [[(np.sqrt(0.5) if k == 0 else 1.0) * 0.5 * np.cos((2 * n + 1) * k * np.pi / 16) for n in range(8)] for k in range(8)],
    dtype=np.float32,
)
_DCT64 = np.kron(_DCT8, _DCT8)  # coefficients.ravel() = _DCT64 @ block.ravel()
_DIFFJPEG_LUMA = IJG_LUMA.reshape(8, 8).T.astype(np.float32).ravel()
_DIFFJPEG_CHROMA = IJG_CHROMA.reshape(8, 8).T.astype(np.float32).ravel()
_RGB_TO_YCBCR = np.array(
    [[0.299, 0.587, 0.114, 0.0], [-0.168736, -0.331264, 0.5, 128.0], [0.5, -0.418688, -0.081312, 128.0]], dtype=np.float32
)  # on 0-255 RGB (the offsets are on the same scale)
_YCBCR_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], dtype=np.float32)


def _quantised(plane: np.ndarray, table: np.ndarray) -> np.ndarray:
    """One plane (H, W multiples of 8, on 0-255) through DCT, quantisation by `table` and the inverse DCT."""
    height, width = plane.shape
    blocks = (plane - np.float32(128)).reshape(height // 8, 8, width // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 64)
    coefficients = blocks @ _DCT64.T
    coefficients = np.round(coefficients / table) * table
    blocks = coefficients @ _DCT64 + np.float32(128)
    return blocks.reshape(height // 8, width // 8, 8, 8).transpose(0, 2, 1, 3).reshape(height, width)


def diffjpeg(image: np.ndarray, quality: float) -> np.ndarray:
    """BasicSR's DiffJPEG round trip at a (float) quality: HxWx3 RGB (uint8, or float clipped to [0, 1] as BasicSR
    clamps before it) -> float32 in [0, 1], not rounded to 8 bits."""
    pixels = image.astype(np.float32) if image.dtype == np.uint8 else np.clip(image, 0.0, 1.0).astype(np.float32) * np.float32(255)
    factor = np.float32((5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality) / 100.0)
    height, width = pixels.shape[:2]
    padded_h, padded_w = -(-height // 16) * 16, -(-width // 16) * 16
    padded = cv2.copyMakeBorder(pixels, 0, padded_h - height, 0, padded_w - width, cv2.BORDER_CONSTANT, value=0)
    ycbcr = cv2.transform(padded, _RGB_TO_YCBCR)
    luma = _quantised(np.ascontiguousarray(ycbcr[..., 0]), _DIFFJPEG_LUMA * factor)
    chroma = cv2.resize(np.ascontiguousarray(ycbcr[..., 1:]), (padded_w // 2, padded_h // 2), interpolation=cv2.INTER_AREA)
    chroma = np.dstack([_quantised(np.ascontiguousarray(chroma[..., i]), _DIFFJPEG_CHROMA * factor) for i in range(2)])
    chroma = cv2.resize(chroma, (padded_w, padded_h), interpolation=cv2.INTER_NEAREST) - np.float32(128)
    rgb = cv2.transform(np.dstack([luma, chroma]), _YCBCR_TO_RGB)
    return np.clip(rgb[:height, :width] / np.float32(255), 0.0, 1.0)


def resize_by_scale(image: np.ndarray, scale: float, mode: str) -> np.ndarray:
    """`F.interpolate(scale_factor=scale, mode=mode)`, as BasicSR's first-order resize: the size floored, and for
    bilinear/bicubic each output pixel x read at (x + 0.5) / scale - 0.5, not at OpenCV's in/out ratio (an offset of up
    to a pixel when the size is floored: 0.04 dB of LQ PSNR). float32 out."""
    import torch

    height, width = max(1, int(image.shape[0] * scale)), max(1, int(image.shape[1] * scale))
    if mode == "area":
        return area_resize(image, height, width)
    tensor = torch.from_numpy(np.ascontiguousarray(as_float(image))).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(tensor, scale_factor=scale, mode=mode)
    return resized[0].permute(1, 2, 0).contiguous().numpy()


def usm_kernel_size(radius: int = 50) -> int:
    """BasicSR's USMSharp(radius): an odd kernel of `radius` (+1 when even) pixels, sigma from OpenCV's rule
    0.3 ((size - 1) / 2 - 1) + 0.8: radius 50 gives 51 x 51 with sigma 8."""
    return radius + 1 if radius % 2 == 0 else radius


@functools.cache
def _usm_kernel(size: int) -> np.ndarray:
    return cv2.getGaussianKernel(size, 0)  # sigma from OpenCV's rule, as BasicSR's USMSharp


def usm_sharpen(image: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: int = 10) -> np.ndarray:
    """Unsharp masking as BasicSR's USMSharp: blend towards `img + weight * (img - blur)` where the residual is over
    `threshold` grey levels, through a blurred soft mask. Takes uint8 or [0, 1] float; returns float32.

    The two 51 x 51 blurs are most of the cost: they filter 8-bit data into float32 (the uint8 image, the 0/1 mask),
    which OpenCV does ~1.4x faster than float to float; the result equals blurring the float image (linear)."""
    kernel = _usm_kernel(usm_kernel_size(radius))
    if image.dtype == np.uint8:
        blurred = cv2.sepFilter2D(image, cv2.CV_32F, kernel * (1.0 / 255.0), kernel)
        image = to_float(image)
    else:
        image = np.ascontiguousarray(image, dtype=np.float32)
        blurred = cv2.sepFilter2D(image, cv2.CV_32F, kernel, kernel)
    residual = cv2.subtract(image, blurred)
    mask = (cv2.absdiff(image, blurred) > np.float32(threshold / 255.0)).view(np.uint8)  # |residual| * 255 > threshold
    soft_mask = cv2.sepFilter2D(mask, cv2.CV_32F, kernel, kernel)
    sharp = np.clip(cv2.scaleAdd(residual, weight, image), 0, 1)
    # soft * sharp + (1 - soft) * image, one pass fewer
    return cv2.add(image, cv2.multiply(soft_mask, cv2.subtract(sharp, image)))


def clamp_round(image: np.ndarray) -> np.ndarray:
    """Real-ESRGAN's last step: clip to [0, 1] and quantise to 8 bits."""
    return to_uint8(image)
