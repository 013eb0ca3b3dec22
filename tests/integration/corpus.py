"""Small corpora for dataset-build tests, made from the bundled photos: clean ones and every awkward kind of file."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from restoray.samples import list_samples


def photos(count: int, size: int = 160) -> list[np.ndarray]:
    """Distinct real photos, centre-cropped to size x size (the stereo pair's right view is left out: it is a
    near-duplicate of the left one)."""
    out = []
    for sample in [s for s in list_samples() if s.name != "motorcycle_right"][:count]:
        image = sample.load()
        side = min(image.shape[:2])
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        out.append(cv2.resize(image[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_AREA))
    return out


def png_bytes(image: np.ndarray | Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# name -> expected reject reason (None = accepted)
AWKWARD_EXPECTED = {
    "clean_a.png": None,
    "clean_b.jpg": None,
    "cmyk.jpg": None,
    "sixteen_bit.png": None,
    "palette.png": None,
    "alpha.png": None,
    "exif_rotated.jpg": None,
    "unicode_caption.png": None,
    "empty_caption.png": None,
    "missing_caption.png": None,
    "long_caption.png": None,
    "truncated.png": "truncated",
    "zero_bytes.jpg": "empty",
    "text.jpg": "not_image",
    "page.html": "not_image",
    "bomb.png": "too_large",
    "tiny.png": "too_small",
    "extreme_aspect.png": "aspect_ratio",
    "blurry.png": "blurry",
    "flat.png": "flat",
    "exact_duplicate.png": "duplicate",  # same bytes as clean_a.png, whose name sorts first
    "resized_duplicate.png": None,  # a 0.8x JPEG re-encode of zz_original.png; its URI sorts first, so it is kept
    "zz_original.png": "near_duplicate",
}
UNICODE_CAPTION = "Ein Käfer 🐞 auf der Blüte — 花の上のてんとう虫, naïve café ½"


def write_awkward_corpus(root: Path) -> dict[str, str | None]:
    """An image folder of every awkward case; returns {file name: expected reject reason or None}."""
    root.mkdir(parents=True, exist_ok=True)
    p = photos(10)
    write = lambda name, payload: (root / name).write_bytes(payload)  # noqa: E731
    write("clean_a.png", png_bytes(p[0]))
    write("clean_b.jpg", png_bytes(p[1], "JPEG", quality=92))
    write("cmyk.jpg", png_bytes(Image.fromarray(p[2]).convert("CMYK"), "JPEG", quality=92))
    write("sixteen_bit.png", png_bytes(Image.fromarray(cv2.cvtColor(p[3], cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257)))
    write("palette.png", png_bytes(Image.fromarray(p[4]).convert("P", palette=Image.Palette.ADAPTIVE)))
    write("alpha.png", png_bytes(Image.fromarray(np.dstack([p[5], np.full(p[5].shape[:2], 200, np.uint8)]), "RGBA")))
    # Stored sideways with EXIF orientation 6: displayed (and decoded) upright, with a white band on top.
    upright = p[6].copy()
    upright[:30] = 255
    stored = np.rot90(upright, k=1).copy()  # a quarter turn counter-clockwise; orientation 6 turns it back
    exif = Image.Image().getexif()
    exif[0x0112] = 6
    write("exif_rotated.jpg", png_bytes(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()))
    for name, image in (
        ("unicode_caption.png", p[7]),
        ("empty_caption.png", p[8]),
        ("missing_caption.png", p[9]),
        ("long_caption.png", p[0][:, ::-1]),
    ):
        write(name, png_bytes(np.ascontiguousarray(image)))
    (root / "unicode_caption.txt").write_text(UNICODE_CAPTION, encoding="utf-8")
    (root / "empty_caption.txt").write_text("", encoding="utf-8")
    (root / "long_caption.txt").write_text("a very long caption " * 5000, encoding="utf-8")  # 100 kB
    a, b, c = p[0], p[1], p[2]
    full = png_bytes(np.ascontiguousarray(a.transpose(1, 0, 2)))
    write("truncated.png", full[: len(full) // 2])
    write("zero_bytes.jpg", b"")
    write("text.jpg", b"this is not an image\n" * 20)
    write("page.html", b"<!DOCTYPE html><html><head><title>404</title></head><body>Not found</body></html>")
    write("bomb.png", png_bytes(Image.new("L", (12000, 12000))))  # 144 MP declared, ~150 kB on disk
    write("tiny.png", png_bytes(cv2.resize(a, (40, 40))))
    write("extreme_aspect.png", png_bytes(cv2.resize(b, (800, 160))))
    write("blurry.png", png_bytes(cv2.GaussianBlur(c, (0, 0), 6)))
    write("flat.png", png_bytes(np.full((160, 160, 3), 128, np.uint8)))
    write("exact_duplicate.png", (root / "clean_a.png").read_bytes())
    original = np.ascontiguousarray(photos(2, size=200)[1][::-1])
    write("zz_original.png", png_bytes(original))
    write("resized_duplicate.png", png_bytes(cv2.resize(original, (160, 160), interpolation=cv2.INTER_AREA), "JPEG", quality=90))
    for name in AWKWARD_EXPECTED:
        stem = Path(name).stem
        if name.endswith((".png", ".jpg")) and not (root / f"{stem}.txt").exists() and stem not in ("missing_caption",):
            (root / f"{stem}.txt").write_text(f"caption of {stem}", encoding="utf-8")
    return dict(AWKWARD_EXPECTED)
