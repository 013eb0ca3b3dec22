"""The IJG (libjpeg) quantisation tables and their quality scaling: one place for the JPEG-quality estimate of the
dataset build (`restoration.measures`) and the float-quality JPEG of the degradations (`degradations.ops.jpeg`)."""

from __future__ import annotations

import numpy as np

# libjpeg's jcparam.c quality-50 tables, natural (row-major) order.
IJG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
).ravel()
IJG_CHROMA = np.full((8, 8), 99.0)
IJG_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]
IJG_CHROMA = IJG_CHROMA.ravel()


def ijg_tables(quality: float, libjpeg_rounding: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(luma, chroma) tables for a quality in (0, 100]: the quality-50 tables times 5000/q (q < 50) or 200 - 2q
    percent. `libjpeg_rounding`: libjpeg's integer formula floor((t s + 50) / 100) (what encoders write); otherwise
    DiffJPEG's float scaling t s / 100, rounded to the nearest integer an encoder takes (BasicSR's float qualities)."""
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    if libjpeg_rounding:
        return tuple(np.clip(np.floor((table * scale + 50) / 100), 1, 255) for table in (IJG_LUMA, IJG_CHROMA))
    return tuple(np.clip(np.round(table * scale / 100), 1, 255) for table in (IJG_LUMA, IJG_CHROMA))
