import numpy as np
from PIL import Image

from restoray.samples import list_samples, materialise


def test_sample_corpus_materialises_as_captioned_image_folder(tmp_path):
    target = tmp_path / "data" / "samples"
    images = materialise(target)
    samples = list_samples()
    assert len(images) == len(samples) >= 10
    names = {p.stem for p in images}
    assert {"astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right", "hubble_deep_field", "retina"} <= names
    short_sides = []
    for sample, path in zip(samples, images, strict=True):
        with Image.open(path) as image:
            assert image.mode == "RGB"
            short_sides.append(min(image.size))
            pixels = np.asarray(image)
        assert pixels.std() > 5  # a real photograph, not a blank
        caption = path.with_suffix(".txt").read_text(encoding="utf-8")
        assert caption.strip() == sample.caption and len(caption.split()) >= 8
    # The reason configs/local.toml trains at 256: several photos are under 512 px on the short side.
    assert sum(side < 512 for side in short_sides) >= 3
    assert min(short_sides) >= 256
    # The stereo pair is two different images.
    left = np.asarray(Image.open(target / "motorcycle_left.png"))
    right = np.asarray(Image.open(target / "motorcycle_right.png"))
    assert left.shape == right.shape and not np.array_equal(left, right)


def test_materialise_is_idempotent_and_repairs(tmp_path):
    images = materialise(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in images}
    caption = images[0].with_suffix(".txt")
    caption.write_text("edited", encoding="utf-8")
    images[1].unlink()
    again = materialise(tmp_path)
    assert again == images
    assert caption.read_text(encoding="utf-8").strip() == list_samples()[0].caption
    assert images[1].exists()
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in images if p != images[1])
    assert not list(tmp_path.glob(".*partial*"))
