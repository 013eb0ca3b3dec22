"""Blur kernels of Real-ESRGAN (BasicSR's formulas) and a fast way to apply them.

Kernels: isotropic/anisotropic Gaussian, generalized Gaussian and plateau (each iso or aniso), and the circular
sinc low-pass. All are normalised to sum 1 and applied as correlation with reflect-101 borders, like BasicSR's
`filter2D` on a reflect-padded tensor.

Speed: `cv2.filter2D` switches to a DFT path from about 11x11 kernels and then costs ~10x more. `apply_kernel`
instead (1) crops border rows/columns that carry almost no weight, and (2) splits the kernel by SVD into the
fewest rank-1 (separable) terms whose residual is within budget, each applied with `cv2.sepFilter2D`. The
budget bounds the worst-case error: |fast - exact| <= sum|dropped kernel weights| * max pixel, kept under
`MAX_ERROR` (0.4 grey levels), so the result rounds to within one grey level of the full-kernel convolution.
Gaussians are rank 1; rotated anisotropic ones and sinc need a few terms.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
from scipy import special

MAX_ERROR = 0.4 / 255.0  # on the [0, 1] scale
_CROP_SHARE = 0.35  # of the error budget spent on cropping, the rest on the rank cut


def _grid(size: int) -> np.ndarray:
    axis = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(axis, axis)
    return np.stack([xx, yy], axis=-1)  # (size, size, 2) of (x, y)


def _mahalanobis(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    covariance = rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T
    grid = _grid(size)
    return np.sum((grid @ np.linalg.inv(covariance)) * grid, axis=-1)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    kernel = np.exp(-0.5 * _mahalanobis(size, sigma_x, sigma_y, theta))
    return kernel / kernel.sum()


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    kernel = np.exp(-0.5 * np.power(_mahalanobis(size, sigma_x, sigma_y, theta), beta))
    return kernel / kernel.sum()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    kernel = 1.0 / (np.power(_mahalanobis(size, sigma_x, sigma_y, theta), beta) + 1.0)
    return kernel / kernel.sum()


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """Circular low-pass (2-D sinc) with cutoff frequency `cutoff` in radians, as BasicSR's circular_lowpass_kernel."""
    center = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    radius = np.hypot(x - center, y - center)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = cutoff * special.j1(cutoff * radius) / (2 * np.pi * radius)
    kernel[int(center), int(center)] = cutoff**2 / (4 * np.pi)
    return kernel / kernel.sum()


def _crop(kernel: np.ndarray, budget: float) -> tuple[np.ndarray, float]:
    """Drop outer row pairs / column pairs while their absolute weight stays within `budget`.

    Opposite sides go together so the kernel keeps its centre (the anchor of the convolution).
    Returns the cropped kernel and the weight dropped.
    """
    top, bottom, left, right = 0, kernel.shape[0], 0, kernel.shape[1]
    spent = 0.0
    changed = True
    while changed:
        changed = False
        if bottom - top > 2:
            weight = float(np.abs(kernel[top, left:right]).sum() + np.abs(kernel[bottom - 1, left:right]).sum())
            if spent + weight <= budget:
                spent, top, bottom, changed = spent + weight, top + 1, bottom - 1, True
        if right - left > 2:
            weight = float(np.abs(kernel[top:bottom, left]).sum() + np.abs(kernel[top:bottom, right - 1]).sum())
            if spent + weight <= budget:
                spent, left, right, changed = spent + weight, left + 1, right - 1, True
    return kernel[top:bottom, left:right], spent


@lru_cache(maxsize=256)
def _separable_terms_cached(kernel_bytes: bytes, shape: tuple[int, int]) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    kernel = np.frombuffer(kernel_bytes, dtype=np.float64).reshape(shape)
    return tuple(separable_terms(kernel))


def separable_terms(kernel: np.ndarray, max_error: float = MAX_ERROR) -> list[tuple[np.ndarray, np.ndarray]]:
    """(column, row) vector pairs whose outer products sum to the kernel within `max_error` in L1."""
    cropped, spent = _crop(kernel, max_error * _CROP_SHARE)
    u, s, vt = np.linalg.svd(cropped)
    terms = []
    approximation = np.zeros_like(cropped)
    for rank in range(len(s)):
        terms.append(((u[:, rank] * s[rank]).astype(np.float32), vt[rank].astype(np.float32)))
        approximation += s[rank] * np.outer(u[:, rank], vt[rank])
        if spent + float(np.abs(cropped - approximation).sum()) <= max_error:
            break
    return terms


# uint8 input is filtered into int16 at this fixed-point scale (255 * 64 < 2^15): OpenCV's 8-bit paths are
# about twice as fast as float32, and the per-term rounding (<= 0.5/64 grey levels) is far inside the budget.
_FIXED_POINT = 64.0


def apply_kernel(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate an HxWxC image (uint8, or float32 in [0, 1]) with a 2-D kernel (reflect-101 borders), separably.

    Returns float32 on the [0, 1] scale. See the module docstring for the error bound.
    """
    kernel = np.ascontiguousarray(kernel, dtype=np.float64)
    terms = _separable_terms_cached(kernel.tobytes(), kernel.shape)
    if image.dtype == np.uint8:
        total = None
        for column, row in terms:
            part = cv2.sepFilter2D(image, cv2.CV_16S, row * np.float32(_FIXED_POINT), column, borderType=cv2.BORDER_REFLECT_101)
            total = part if total is None else cv2.add(total, part, dtype=cv2.CV_16S)
        return total.astype(np.float32) * np.float32(1.0 / (_FIXED_POINT * 255.0))
    result = None
    for column, row in terms:
        part = cv2.sepFilter2D(image, cv2.CV_32F, row, column, borderType=cv2.BORDER_REFLECT_101)
        result = part if result is None else cv2.add(result, part)
    return result


def apply_kernel_reference(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The plain full-kernel correlation (`cv2.filter2D`) that `apply_kernel` must match; for tests and benchmarks."""
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    return cv2.filter2D(image, cv2.CV_32F, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)
