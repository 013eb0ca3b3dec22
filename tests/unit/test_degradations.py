import io
import math
import sys
import textwrap
from collections import Counter

import cv2
import numpy as np
import pytest
from PIL import Image

from restoration.degradations import (
    REGISTRY,
    CompositeConfig,
    DegradationType,
    ParameterizedConfig,
    RealESRGANConfig,
    composite_degrade,
    kernels,
    negative_degrade,
    ops,
    parameterized_degrade,
    realesrgan_degrade,
    single_degrade,
)
from restoration.degradations.parameterized import apply_op
from restoration.degradations.realesrgan import BlurConfig, kernel_from_params, random_kernel
from restoration.degradations.registry import DegradationRegistry
from restoration.prompts import BLIND_PROMPT, PromptOp, PromptParseError, parse, render


@pytest.fixture(scope="module")
def photo():
    import skimage.data

    return cv2.resize(skimage.data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def noise_image():
    return (np.random.default_rng(7).random((96, 96, 3)) * 255).astype(np.uint8)


def _all_kernel_families(rng):
    for _ in range(12):
        size = int(rng.choice(np.arange(7, 22, 2)))
        sx, sy = rng.uniform(0.2, 3, 2)
        theta = rng.uniform(-math.pi, math.pi)
        yield kernels.gaussian_kernel(size, sx, sx, 0)
        yield kernels.gaussian_kernel(size, sx, sy, theta)
        yield kernels.generalized_gaussian_kernel(size, sx, sy, theta, rng.uniform(0.5, 4))
        yield kernels.plateau_kernel(size, sx, sy, theta, rng.uniform(1, 2))
        yield kernels.sinc_kernel(size, rng.uniform(math.pi / 5, math.pi))


def test_fast_blur_matches_full_kernel_filter2d(photo, noise_image):
    rng = np.random.default_rng(0)
    for kernel in _all_kernel_families(rng):
        for image in (photo, noise_image, ops.to_float(photo)):
            fast = ops.to_uint8(kernels.apply_kernel(image, kernel)).astype(int)
            reference = ops.to_uint8(kernels.apply_kernel_reference(image, kernel)).astype(int)
            assert np.abs(fast - reference).max() <= 1, kernel.shape


def test_isotropic_gaussian_is_one_separable_pass():
    assert len(kernels.separable_terms(kernels.gaussian_kernel(21, 2.0, 2.0, 0.0))) == 1
    assert kernels.sinc_kernel(13, 1.0).sum() == pytest.approx(1.0)


def test_gaussian_noise_variance(photo):
    rng = np.random.default_rng(1)
    flat = np.full((256, 256, 3), 0.5, np.float32)
    for sigma in (0.01, 0.05, 0.1):
        noise = ops.gaussian_noise(flat, sigma, gray=False, rng=rng) - flat
        assert noise.var() == pytest.approx(sigma**2, rel=0.05)
        assert abs(noise.mean()) < sigma * 0.02
    gray = ops.gaussian_noise(flat, 0.05, gray=True, rng=rng) - flat
    assert np.array_equal(gray[..., 0], gray[..., 2])


def test_poisson_noise_matches_numpy_poisson_variance(photo):
    image = ops.to_float(photo)
    for gray in (False, True):
        for scale in (0.5, 2.0):
            fast = np.stack([ops.poisson_noise(image, scale, gray, np.random.default_rng(s)) - image for s in range(6)])
            exact = np.stack([ops.poisson_noise_reference(image, scale, gray, np.random.default_rng(s)) - image for s in range(6)])
            # Variance per brightness band, where the Poisson variance lives.
            brightness = np.broadcast_to(image.mean(axis=2, keepdims=True), image.shape)
            for low, high in ((0.15, 0.35), (0.35, 0.6), (0.6, 0.9)):
                band = (brightness >= low) & (brightness < high)
                assert fast[:, band].var() == pytest.approx(exact[:, band].var(), rel=0.05), (gray, scale, low)


def test_jpeg_matches_pil(photo):
    for quality in (30, 60, 95):
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="JPEG", quality=quality)
        reference = np.asarray(Image.open(buffer).convert("RGB")).astype(int)
        ours = ops.jpeg(photo, quality).astype(int)
        assert np.abs(ours - reference).max() <= 1, quality


def test_realesrgan_shapes_dtypes_and_determinism(photo):
    for resize_back in (False, True):
        config = RealESRGANConfig(resize_back=resize_back)
        first = realesrgan_degrade(photo, np.random.default_rng(5), config)
        second = realesrgan_degrade(photo, np.random.default_rng(5), config)
        assert first.lq.dtype == np.uint8 and first.kind == "realesrgan" and first.restoration_prompt == BLIND_PROMPT
        assert first.lq.shape == ((128, 128, 3) if resize_back else (32, 32, 3))
        assert np.array_equal(first.lq, second.lq) and first.ops == second.ops
    other = realesrgan_degrade(photo, np.random.default_rng(6))
    assert not np.array_equal(other.lq, realesrgan_degrade(photo, np.random.default_rng(5)).lq)
    sharpened = realesrgan_degrade(photo, np.random.default_rng(5), RealESRGANConfig(usm_target=True))
    assert not np.array_equal(sharpened.hq, photo) and sharpened.ops[0]["op"] == "usm_target"


def test_realesrgan_parameters_stay_in_range_over_many_seeds(photo):
    config = RealESRGANConfig()
    small = photo[:64, :64]
    counts = Counter()
    for seed in range(150):
        sample = realesrgan_degrade(small, np.random.default_rng(seed), config)
        blurs = [op for op in sample.ops if op["op"] == "blur"]
        noises = [op for op in sample.ops if op["op"].endswith("_noise")]
        jpegs = [op for op in sample.ops if op["op"] == "jpeg"]
        assert len(noises) == 2 and len(jpegs) == 2 and 1 <= len(blurs) <= 3
        for index, noise in enumerate(noises):
            noise_config = config.noise1 if index == 0 else config.noise2
            if noise["op"] == "gaussian_noise":
                assert noise_config.sigma[0] <= noise["sigma"] <= noise_config.sigma[1]
            else:
                assert noise_config.poisson_scale[0] <= noise["scale"] <= noise_config.poisson_scale[1]
        for jpeg in jpegs:
            assert 30 <= jpeg["quality"] <= 95
        for blur in blurs:
            assert 7 <= blur["size"] <= 21 and blur["size"] % 2 == 1
            if blur["kernel"] != "sinc":
                assert 0.2 <= blur["sigma_x"] <= 3.0 and 0.2 <= blur["sigma_y"] <= 3.0
            # The recorded parameters rebuild a valid kernel.
            assert kernel_from_params(blur).sum() == pytest.approx(1.0)
        counts["second_blur"] += any(op["op"] == "blur" and op["stage"] == 2 for op in sample.ops)
        counts["final_sinc"] += any(op["op"] == "blur" and op["stage"] == "final" for op in sample.ops)
        counts["gaussian_noise"] += sum(op["op"] == "gaussian_noise" for op in sample.ops)
        first_resize = next(op for op in sample.ops if op["op"] == "resize")
        counts["first_down"] += first_resize["height"] < 64
        # The LQ size is always HQ/scale at the end.
        assert sample.lq.shape == (16, 16, 3)
    assert counts["second_blur"] / 150 == pytest.approx(0.8, abs=0.1)
    assert counts["final_sinc"] / 150 == pytest.approx(0.8, abs=0.1)
    assert counts["gaussian_noise"] / 300 == pytest.approx(0.5, abs=0.1)
    assert counts["first_down"] / 150 == pytest.approx(0.7, abs=0.1)


def test_kernel_mix_follows_the_configured_probabilities():
    rng = np.random.default_rng(0)
    config = BlurConfig()
    draws = Counter(random_kernel(config, rng)[1]["kernel"] for _ in range(4000))
    assert draws["sinc"] / 4000 == pytest.approx(0.1, abs=0.02)
    for kind, probability in zip(config.kernel_types, config.kernel_probabilities, strict=True):
        assert draws[kind] / 4000 == pytest.approx(0.9 * probability, abs=0.025), kind


def test_bad_chain_configs_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        BlurConfig(kernel_probabilities=(0.5, 0.5, 0.5, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="low end above"):
        ParameterizedConfig(blur_sigma=(3.0, 1.0))
    with pytest.raises(ValueError):
        RealESRGANConfig(scale=0)


def test_prompt_round_trip():
    ops_list = [PromptOp("blur", 2.0), PromptOp("downsample", 4.0), PromptOp("noise", 0.06), PromptOp("jpeg", 40)]
    text = render(ops_list)
    assert text == "Deblur with sigma 2.0; Upsample to 4.0x; Denoise with sigma 0.06; Dejpeg with quality 40"
    assert parse(text) == ops_list
    for free in ([PromptOp("blur"), PromptOp("jpeg")], [PromptOp("Derain")], []):
        assert parse(render(free)) == free
    assert render([]) == "Remove all degradation"
    with pytest.raises(PromptParseError):
        parse("Deblur with sigma two")


def test_parameterized_prompt_numbers_are_the_parameters_applied(photo):
    config = ParameterizedConfig(parameter_free_probability=0.0)
    seen = Counter()
    for seed in range(60):
        sample = parameterized_degrade(photo, np.random.default_rng(seed), config)
        assert sample.kind == "parameterized" and sample.lq.shape == photo.shape and sample.lq.dtype == np.uint8
        parsed = parse(sample.restoration_prompt)
        assert [(op.op, op.value) for op in parsed] == [(entry["op"], entry["value"]) for entry in sample.ops]
        assert [op.op for op in parsed] == [op for op in ("blur", "downsample", "noise", "jpeg") if op in {p.op for p in parsed}]
        for op in parsed:
            seen[op.op] += 1
            low, high = {
                "blur": config.blur_sigma,
                "downsample": config.downsample_factor,
                "noise": config.noise_sigma,
                "jpeg": config.jpeg_quality,
            }[op.op]
            assert low <= op.value <= high
        if all(op.op != "noise" for op in parsed):
            # Without noise the chain is a pure function of the prompt: re-applying the parsed ops gives the LQ.
            image = photo
            for op in parsed:
                image = apply_op(image, op.op, op.value, np.random.default_rng(0), photo.shape[:2])
            assert np.array_equal(ops.to_uint8(image), sample.lq)
    assert all(seen[op] > 15 for op in ("blur", "downsample", "noise", "jpeg"))
    free = [parameterized_degrade(photo, np.random.default_rng(s), ParameterizedConfig(parameter_free_probability=1.0)) for s in range(5)]
    assert all(op.value is None for sample in free for op in parse(sample.restoration_prompt))


def test_registry_has_stable_ids_and_prompts():
    names = REGISTRY.id_to_name()
    assert {1: "noise", 2: "blur", 3: "jpeg", 4: "downsample", 5: "rain", 6: "haze", 7: "low_light"}.items() <= names.items()
    assert names[0] == "clean"
    with pytest.raises(KeyError, match="unknown degradation type 'snow'"):
        REGISTRY.get("snow")
    registry = DegradationRegistry()
    registry.register(REGISTRY.get("noise"))
    with pytest.raises(ValueError, match="id 1 is taken"):
        registry.register(DegradationType(1, "other", (0, 1), lambda i, s, r: (i, {}), lambda p: PromptOp("Other"), "Other"))
    with pytest.raises(ValueError, match=r"id must be in 1\.\.255"):
        DegradationType(0, "zero", (0, 1), lambda i, s, r: (i, {}), lambda p: PromptOp("Zero"), "Zero")


@pytest.mark.parametrize("name", ["noise", "blur", "jpeg", "downsample", "rain", "haze", "low_light"])
def test_single_type_degrades_the_whole_image(photo, name):
    kind = REGISTRY.get(name)
    sample = single_degrade(photo, np.random.default_rng(3), name)
    again = single_degrade(photo, np.random.default_rng(3), name)
    assert np.array_equal(sample.lq, again.lq)
    assert sample.kind == "single" and sample.lq.shape == photo.shape and sample.lq.dtype == np.uint8
    assert (sample.mask == kind.id).all()
    assert np.abs(sample.lq.astype(int) - photo.astype(int)).mean() > 1.0
    assert kind.severity[0] <= sample.ops[0]["severity"] <= kind.severity[1]
    parsed = parse(sample.restoration_prompt)
    assert len(parsed) == 1
    if name in ("noise", "blur", "jpeg", "downsample"):
        assert parsed[0] == PromptOp(name, sample.ops[0]["params"]["value"])
    else:
        assert parsed[0].value is None and sample.restoration_prompt == kind.phrase


def test_composite_mask_matches_regions_and_types(photo):
    for seed in range(12):
        sample = composite_degrade(photo, np.random.default_rng(seed), CompositeConfig())
        again = composite_degrade(photo, np.random.default_rng(seed), CompositeConfig())
        assert np.array_equal(sample.lq, again.lq) and np.array_equal(sample.mask, again.mask)
        assert sample.kind == "composite" and sample.mask.dtype == np.uint8 and sample.mask.shape == photo.shape[:2]
        applied = {entry["id"]: entry for entry in sample.ops}
        assert 2 <= len(applied) <= 4 and len(applied) == len(sample.ops)  # distinct types
        assert set(np.unique(sample.mask)) <= set(applied) | {0}
        for type_id, entry in applied.items():
            assert REGISTRY.get(type_id).name == entry["type"]
            assert entry["pixels"] == int((sample.mask == type_id).sum())
        clean = sample.mask == 0
        assert np.array_equal(sample.lq[clean], photo[clean])
        changed = np.abs(sample.lq.astype(int) - photo.astype(int)).max(axis=2) > 0
        for type_id, entry in applied.items():
            region = sample.mask == type_id
            if entry["pixels"] > 200:
                # Rain streaks are sparse; every other type touches most pixels of its region.
                assert changed[region].mean() > (0.05 if entry["type"] == "rain" else 0.3), entry["type"]
    restricted = composite_degrade(photo, np.random.default_rng(0), CompositeConfig(types=("noise", "haze"), regions=(2, 2)))
    assert {entry["type"] for entry in restricted.ops} == {"noise", "haze"}


def test_negative_samples(photo):
    sample = negative_degrade(photo, np.random.default_rng(0))
    assert sample.kind == "degraded_negative" and sample.restoration_prompt == ""
    assert sample.hq.shape == photo.shape and sample.lq.shape == (32, 32, 3)
    # The target itself is of low quality: much further from the photo than a q95 JPEG of it.
    assert np.abs(sample.hq.astype(int) - photo.astype(int)).mean() > 10
    assert np.array_equal(sample.hq, negative_degrade(photo, np.random.default_rng(0)).hq)


def test_plugins_register_through_the_entry_point_group(tmp_path, monkeypatch):
    package = tmp_path / "restoray_snow"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            from restoration.degradations import DegradationType
            from restoration.prompts import PromptOp

            def _snow(image, severity, rng):
                return image, {"severity": severity}

            SNOW = DegradationType(42, "snow", (0.1, 0.5), _snow, lambda params: PromptOp("Desnow"), "Desnow", "snow")
            """
        )
    )
    dist = tmp_path / "restoray_snow-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: restoray-snow\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[restoray.degradations]\nsnow = restoray_snow:SNOW\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = DegradationRegistry()
    registry.load_plugins()
    assert registry.get("snow").id == 42 and registry.id_to_name()[42] == "snow"
    sample = single_degrade(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0), "snow", registry=registry)
    assert sample.restoration_prompt == "Desnow" and (sample.mask == 42).all()
    sys.modules.pop("restoray_snow", None)


def test_noise_is_fresh_per_sample():
    from restoration.degradations import ops

    zeros = np.zeros((64, 64, 3), np.float32)
    first = ops.gaussian_noise(zeros, 1.0, False, np.random.default_rng(1)).ravel()
    second = ops.gaussian_noise(zeros, 1.0, False, np.random.default_rng(2)).ravel()
    assert np.array_equal(first, ops.gaussian_noise(zeros, 1.0, False, np.random.default_rng(1)).ravel())
    # Windows of one shared table would share thousands of exact values (shifted copies); fresh draws share ~none.
    assert len(np.intersect1d(first, second)) < 5 and abs(np.corrcoef(first, second)[0, 1]) < 0.05


def test_usm_uses_basicsr_kernel_and_area_is_torch_area():
    import cv2
    import torch

    from restoration.degradations import ops

    assert ops.usm_kernel_size(50) == 51  # BasicSR's USMSharp(radius=50): 51 x 51 ...
    assert np.allclose(cv2.getGaussianKernel(51, 0), cv2.getGaussianKernel(51, 8.0))  # ... with sigma 8
    image = np.random.default_rng(0).random((37, 53, 3), dtype=np.float32)
    for size in ((13, 20), (80, 101)):
        expected = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=size, mode="area")
        assert np.allclose(ops.resize(image, *size, "area"), expected[0].permute(1, 2, 0).numpy(), atol=1e-6)


def test_float_jpeg_quality_scales_the_ijg_tables():
    from restoration.degradations import ops
    from restoration.jpeg_tables import ijg_tables

    luma_low, _ = ijg_tables(30.5)
    luma_high, _ = ijg_tables(90.25)
    assert (luma_low >= luma_high).all() and luma_low.sum() > luma_high.sum()
    assert np.array_equal(ijg_tables(50.0)[0], ijg_tables(50)[0])
    photo = np.asarray(__import__("skimage.data").data.astronaut()[:128, :128])
    error = {q: np.abs(ops.jpeg(photo, q).astype(float) - photo).mean() for q in (30.5, 60.75, 90.25)}
    assert error[30.5] > error[60.75] > error[90.25]


def test_spire_skips_ops_independently_and_prints_the_factor_it_applies():
    from restoration.degradations.parameterized import ParameterizedConfig, parameterized_degrade

    hq = np.random.default_rng(0).integers(0, 255, (150, 210, 3), dtype=np.uint8)
    rng = np.random.default_rng(3)
    counts, clean = {}, 0
    for _ in range(200):
        sample = parameterized_degrade(hq, rng)
        ops_applied = [entry["op"] for entry in sample.ops]
        for op in ops_applied:
            counts[op] = counts.get(op, 0) + 1
        if not ops_applied:
            clean += 1
            assert np.array_equal(sample.lq, hq) and sample.restoration_prompt == "Remove all degradation"
    assert 0 < clean < 30 and all(70 < count < 130 for count in counts.values())  # each op fires about half the time
    always_down = ParameterizedConfig(op_probability=1.0)
    for _ in range(20):
        factor = next(entry["value"] for entry in parameterized_degrade(hq, rng, always_down).ops if entry["op"] == "downsample")
        assert round(150 / round(150 / factor), 1) == factor  # the printed factor is H / rows of the image made


def test_composites_mix_abairs_seen_types_by_default():
    from restoration.degradations import CompositeConfig, composite_degrade

    hq = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(30):
        seen |= {entry["type"] for entry in composite_degrade(hq, rng).ops}
    assert seen <= {"rain", "haze", "noise", "blur", "low_light"} and len(seen) >= 4
    assert CompositeConfig().types == ("rain", "haze", "noise", "blur", "low_light")


def test_the_registry_holds_the_built_in_types_however_it_is_imported():
    """The package loads its submodules lazily: the registry module alone, first in a fresh interpreter, still
    knows the built-in types (the Serve UI's phrases and the experts' names come from it)."""
    import subprocess
    import sys

    code = "from restoration.degradations.registry import REGISTRY; print(','.join(t.name for t in REGISTRY.all()))"
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip().split(",")
    assert {"noise", "blur", "jpeg"} <= set(names), names


@pytest.mark.parametrize("gaussian", [True, False])
def test_realesrgan_noise_is_clipped_to_the_unit_range_as_basicsr_clips_it(gaussian):
    """BasicSR adds Real-ESRGAN's noise with clip=True: the resize, sinc and JPEG after it see [0, 1], never beyond."""
    from restoration.degradations.realesrgan import NoiseConfig, _random_noise

    image = np.full((32, 32, 3), 0.98, np.float32)
    image[:16] = 0.02  # near both ends: strong noise crosses each
    config = NoiseConfig(gaussian_probability=1.0 if gaussian else 0.0, sigma=(30, 30), poisson_scale=(3.0, 3.0), gray_probability=0.0)
    noisy = _random_noise(image, config, np.random.default_rng(0), [])
    assert noisy.min() == 0.0 and noisy.max() == 1.0  # clipped, and the noise did reach past both ends
    assert 0 < np.mean(noisy != image)


def test_realesrgans_jpeg_is_diffjpegs_zero_padded_with_nearest_chroma(photo):
    """BasicSR's DiffJPEG, not a codec: the image is padded with black to a multiple of 16 (a codec repeats the edge),
    so the last partial block rings dark; chroma comes back by nearest neighbour (constant over each 2 x 2)."""
    from restoration.degradations import ops

    white = np.full((36, 36, 3), 250, np.uint8)  # 36 = 32 + 4: the last block rows and columns are half padding
    ours, codec = ops.diffjpeg(white, 50.0) * 255, ops.jpeg(white, 50.5).astype(float)
    assert np.abs(ours[:32, :32] - 250).max() < 3 and np.abs(codec[:32, :32] - 250).max() < 3  # away from the padding
    assert np.abs(ours[32:, 32:] - 250).mean() > np.abs(codec[32:, 32:] - 250).mean() + 5  # the zeros ring into the edge
    image = photo[:64, :64]
    ycbcr = cv2.cvtColor((ops.diffjpeg(image, 90.0) * 255).astype(np.float32), cv2.COLOR_RGB2YCrCb)
    assert np.abs(ycbcr[0::2, :, 1] - ycbcr[1::2, :, 1]).mean() < np.abs(ycbcr[:, :, 1] - np.roll(ycbcr[:, :, 1], 1, 0)).mean()
    assert np.abs(ops.diffjpeg(image, 90.0) * 255 - image).mean() < 4  # still a faithful round trip at q 90


def test_the_first_order_resize_reads_pixels_as_f_interpolate_with_a_scale_factor():
    """BasicSR resizes by scale_factor: output x reads (x + 0.5) / scale - 0.5; OpenCV, given the floored size, reads
    at the in/out ratio instead, a shift that grows across the image."""
    from restoration.degradations import ops

    ramp = np.tile(np.linspace(0, 1, 101, dtype=np.float32)[None, :, None], (8, 1, 3))
    ours = ops.resize_by_scale(ramp, 0.37, "bilinear")
    assert ours.shape == (2, 37, 3)  # floor(8 x 0.37), floor(101 x 0.37)
    expected = np.clip((np.arange(37) + 0.5) / 0.37 - 0.5, 0, 100) / 100  # a linear ramp: the read position itself
    assert np.allclose(ours[0, :, 0], expected, atol=1e-5)
    assert not np.allclose(cv2.resize(ramp, (37, 2), interpolation=cv2.INTER_LINEAR)[0, :, 0], expected, atol=1e-3)
