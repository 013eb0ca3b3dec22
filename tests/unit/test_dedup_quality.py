import io

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.config import DedupConfig
from pipelines.stages.dedup import find_duplicates
from restoration.measures import entropy, estimate_jpeg_quality, hamming, perceptual_hash, sharpness
from restoray.samples import list_samples


@pytest.fixture(scope="module")
def photos():
    out = []
    for sample in list_samples()[:6]:
        image = sample.load()
        side = min(image.shape[:2])
        out.append(cv2.resize(image[:side, :side], (256, 256), interpolation=cv2.INTER_AREA))
    return out


def _jpeg(image, quality):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_jpeg_quality_is_estimated_from_the_quantisation_tables(photos):
    for quality in (20, 45, 75, 95):
        assert abs(estimate_jpeg_quality(_jpeg(photos[0], quality)) - quality) <= 2
    png = io.BytesIO()
    Image.fromarray(photos[0]).save(png, format="PNG")
    assert estimate_jpeg_quality(png.getvalue()) is None


def test_perceptual_hash_catches_resized_reencodes_not_distinct_photos(photos):
    original = perceptual_hash(photos[0])
    resized = cv2.resize(photos[0], (180, 180), interpolation=cv2.INTER_AREA)
    reencoded = np.asarray(Image.open(io.BytesIO(_jpeg(resized, 70))))
    assert hamming(original, perceptual_hash(reencoded)) <= 6
    distinct = [perceptual_hash(p) for p in photos]
    for i in range(len(distinct)):
        for j in range(i + 1, len(distinct)):
            if {list_samples()[i].name, list_samples()[j].name} != {"motorcycle_left", "motorcycle_right"}:
                assert hamming(distinct[i], distinct[j]) > 6


def test_duplicates_keep_the_smallest_source_whatever_the_order():
    sources = ["c.png", "a.png", "b.png", "d.png", "e.png"]
    sha = ["x", "x", "y", "z", "w"]
    far_a, far_b, far_e = 0x5555555555555555, 0x00FF00FF00FF00FF, 0x0F0F0F0F0F0F0F0F  # 32 bits from each other
    phash = [far_a, far_a, far_b, far_b ^ 1, far_e]  # b and d are 1 bit apart
    decisions = find_duplicates(sources, sha, phash, DedupConfig())
    assert decisions == {
        "c.png": ("duplicate", "same bytes as a.png"),
        "d.png": ("near_duplicate", "perceptual hash 1 bits from b.png"),
    }
    order = [4, 2, 0, 3, 1]
    shuffled = find_duplicates([sources[i] for i in order], [sha[i] for i in order], [phash[i] for i in order], DedupConfig())
    assert shuffled == decisions
    assert find_duplicates(sources, sha, phash, DedupConfig(exact=False, perceptual=False)) == {}


def test_sharpness_is_resolution_normalised_and_catches_blur(photos):
    sharp = sharpness(photos[0])
    upscaled = cv2.resize(photos[0], (768, 768), interpolation=cv2.INTER_CUBIC)
    assert sharpness(cv2.resize(upscaled, (512, 512), interpolation=cv2.INTER_AREA)) == pytest.approx(sharpness(upscaled), rel=0.35)
    assert sharpness(cv2.GaussianBlur(photos[0], (0, 0), 4)) < sharp / 10
    assert entropy(np.full((32, 32, 3), 9, np.uint8)) == 0.0 and entropy(photos[0]) > 5


def test_clip_duplicates_keep_the_smallest_uri_and_a_chain_drops_only_what_repeats_a_kept_image():
    from pipelines.stages.dedup import find_clip_duplicates

    angle = np.deg2rad(14)  # neighbours 14 degrees apart: cosine 0.970; two steps apart: 0.883
    vectors = np.array([[np.cos(i * angle), np.sin(i * angle), 0.0] for i in range(3)] + [[0.0, 0.0, 1.0]], np.float32)
    sources = ["s3://b/c.png", "s3://b/b.png", "s3://b/a.png", "s3://b/z.png"]  # a~b, b~c, a and c apart; z alone
    dropped = find_clip_duplicates(sources, vectors, threshold=0.96)
    # In URI order: a kept; b repeats a (dropped); c repeats only b, which is gone, so c stays (connected components
    # would have dropped it too); z is unrelated.
    assert dropped.keys() == {"s3://b/b.png"} and "0.9703 with s3://b/a.png" in dropped["s3://b/b.png"]
    # Equality counts; below every cosine nothing is dropped.
    assert set(find_clip_duplicates(sources[:2], vectors[:2], threshold=float(vectors[0] @ vectors[1]))) == {"s3://b/c.png"}
    assert find_clip_duplicates(sources, vectors, threshold=0.99) == {}
