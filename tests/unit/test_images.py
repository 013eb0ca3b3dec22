import io

import cv2
import numpy as np
import pytest
from PIL import Image

from restoration.images import ImageDecodeError, decode_image, encode_jpeg, encode_png


@pytest.fixture(scope="module")
def photo():
    import skimage.data

    return cv2.resize(skimage.data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"])
def test_every_format_decodes_to_rgb8(photo, fmt):
    decoded = decode_image(_save(Image.fromarray(photo), fmt))
    assert decoded.dtype == np.uint8 and decoded.shape == photo.shape
    tolerance = {"JPEG": 20, "WEBP": 25, "GIF": 80}.get(fmt, 0)
    assert np.abs(decoded.astype(int) - photo.astype(int)).mean() <= max(tolerance / 4, 0.0) + (0 if tolerance == 0 else 1)
    if tolerance == 0:
        assert np.array_equal(decoded, photo)


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(data)
    assert tuple(decoded[0, 0]) == (255, 0, 0)


def test_modes_convert_to_rgb8():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    # L: grey spread over the channels.
    assert np.array_equal(decode_image(_save(Image.fromarray(grey, "L"), "PNG"))[..., 1], grey)
    # RGBA / LA: composited on white.
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    out = decode_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[3, 3]) == (255, 255, 255)
    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), np.full((4, 4), 0, np.uint8)], -1), "LA")
    assert tuple(decode_image(_save(la, "PNG"))[0, 0]) == (255, 255, 255)
    # P with and without transparency.
    palette = Image.fromarray(np.full((4, 4, 3), (10, 120, 250), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert tuple(decode_image(_save(palette, "PNG"))[0, 0]) == (10, 120, 250)
    transparent = palette.copy()
    transparent.info["transparency"] = transparent.getpixel((0, 0))
    assert tuple(decode_image(_save(transparent, "PNG", transparency=transparent.getpixel((0, 0))))[0, 0]) == (255, 255, 255)
    # CMYK (JPEG and TIFF carry it).
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red
    for fmt in ("JPEG", "TIFF"):
        red = decode_image(_save(cmyk, fmt)).astype(int)[0, 0]
        assert red[0] > 200 and red[1] < 60 and red[2] < 60, (fmt, red)
    # 16-bit greyscale: scaled from the 16-bit range.
    wide = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    decoded16 = decode_image(_save(Image.fromarray(wide), "PNG"))
    assert decoded16[0, :, 0].tolist() == [0, 100, 255]
    # 32-bit integer and float (TIFF).
    as_int = Image.fromarray(np.array([[0, 257 * 50, 65535]], dtype=np.int32))
    assert decode_image(_save(as_int, "TIFF"))[0, :, 0].tolist() == [0, 50, 255]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert decode_image(_save(as_float, "TIFF"))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied():
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10] = 255  # white on the left
    image = Image.fromarray(wide)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    decoded = decode_image(_save(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.shape == (30, 10, 3)  # upright: taller than wide
    assert decoded[:10].mean() > 200 and decoded[20:].mean() < 50  # the white left side is now on top


def test_typed_errors(photo):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"")
    assert err.value.reason == "empty"
    for junk in (b"just some text\n" * 10, b"<!DOCTYPE html><html><body>404</body></html>"):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(junk)
        assert err.value.reason == "not_image"
    full = _save(Image.fromarray(photo), "PNG")
    for cut in (full[: len(full) // 2], _save(Image.fromarray(photo), "JPEG")[:600]):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(cut)
        assert err.value.reason == "truncated", err.value
    assert err.value.exit_code == 2


def test_pixel_limit_is_checked_before_decoding():
    # A 20000x20000 PNG of one colour compresses to ~1 MB; decoding it would take 1.2 GB.
    bomb = _save(Image.new("L", (20000, 20000)), "PNG")
    assert len(bomb) < 2_000_000
    with pytest.raises(ImageDecodeError) as err:
        decode_image(bomb)
    assert err.value.reason == "too_large"
    # Over our 64 MP default but under PIL's own refusal: our check, from the header.
    over_default = _save(Image.new("L", (9000, 9000)), "PNG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(over_default)
    assert err.value.reason == "too_large" and "81,000,000 pixels" in str(err.value)
    small = _save(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(small, max_pixels=9999)
    assert err.value.reason == "too_large"
    assert decode_image(small, max_pixels=10000).shape == (100, 100, 3)


def test_encoders_round_trip(photo):
    assert np.array_equal(decode_image(encode_png(photo)), photo)
    jpeg = decode_image(encode_jpeg(photo, quality=95))
    assert np.abs(jpeg.astype(int) - photo.astype(int)).mean() < 3
    assert len(encode_jpeg(photo, quality=30)) < len(encode_jpeg(photo, quality=95))
    with pytest.raises(ValueError, match="uint8"):
        encode_png(photo.astype(np.float32))
