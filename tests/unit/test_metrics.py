"""Metrics against known values and against plain re-expressions of each convention's reference implementation.

The re-expressions are written from the reference code's facts, in numpy/OpenCV/SciPy rather than the torch code they
check: BasicSR 1.4 (`basicsr/metrics/psnr_ssim.py`, `utils/color_util.py`), pyiqa 0.1.16 (`archs/psnr_arch.py`,
`archs/ssim_arch.py`, `archs/func_util.py::preprocess_rgb`, `utils/color_util.py::to_y_channel, rgb2yiq, rgb2ycbcr`,
`matlab_utils/functions.py::fspecial`; inputs through torchvision's `to_tensor`, float32 / 255) and PromptIR
(`utils/val_utils.py::compute_psnr_ssim`: scikit-image on float32 [0, 1] RGB). `bench/metric_references.py` runs the
real pyiqa and clean-fid beside these on the same pairs.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

from restoration.evaluation.metrics import BASICSR, CONVENTIONS, MetricConvention, psnr, ssim


def basicsr_y(image_rgb: np.ndarray) -> np.ndarray:
    """BasicSR's to_y_channel on a cv2 (BGR) image: float32 / 255, bgr2ycbcr(y_only=True), x 255."""
    bgr = image_rgb[..., ::-1].astype(np.float32) / 255.0
    return (np.dot(bgr, [24.966, 128.553, 65.481]) + 16.0)[..., None]


def _crop(a: np.ndarray, border: int) -> np.ndarray:
    return a[border:-border, border:-border] if border else a


def basicsr_psnr(a: np.ndarray, b: np.ndarray, crop_border: int) -> float:
    a, b = _crop(basicsr_y(a).astype(np.float64), crop_border), _crop(basicsr_y(b).astype(np.float64), crop_border)
    return 10.0 * np.log10(255.0**2 / np.mean((a - b) ** 2))


def basicsr_ssim(a: np.ndarray, b: np.ndarray, crop_border: int) -> float:
    a = _crop(basicsr_y(a).astype(np.float64)[..., 0], crop_border)
    b = _crop(basicsr_y(b).astype(np.float64)[..., 0], crop_border)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    mu1, mu2 = cv2.filter2D(a, -1, window)[5:-5, 5:-5], cv2.filter2D(b, -1, window)[5:-5, 5:-5]
    sigma1 = cv2.filter2D(a**2, -1, window)[5:-5, 5:-5] - mu1**2
    sigma2 = cv2.filter2D(b**2, -1, window)[5:-5, 5:-5] - mu2**2
    sigma12 = cv2.filter2D(a * b, -1, window)[5:-5, 5:-5] - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / ((mu1**2 + mu2**2 + c1) * (sigma1 + sigma2 + c2))
    return float(ssim_map.mean())


def pyiqa_luma(image_rgb: np.ndarray, color_space: str) -> np.ndarray:
    """pyiqa's to_y_channel(x, 255, color_space) on float32 [0, 1] RGB: the transform's first row, x 255, rounded."""
    rgb = image_rgb.astype(np.float32) / np.float32(255)
    if color_space == "yiq":  # rgb2yiq
        luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    else:  # rgb2ycbcr: (x @ W + 16) / 255
        luma = (rgb @ np.array([65.481, 128.553, 24.966], np.float32) + np.float32(16)) / np.float32(255)
    return np.round(luma * np.float32(255)).astype(np.float64)


def pyiqa_ssim(a: np.ndarray, b: np.ndarray, color_space: str) -> float:
    """pyiqa's SSIM(test_y_channel=True, color_space=...): fspecial(11, 1.5) (float32), 'valid' filtering, data
    range 255, F.relu on the contrast-structure map."""
    x, y = pyiqa_luma(a, color_space), pyiqa_luma(b, color_space)
    grid = np.arange(-5.0, 6.0)
    h = np.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * 1.5**2))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    window = (h / h.sum()).astype(np.float32).astype(np.float64)

    def valid(image):
        return correlate2d(image, window, mode="valid")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = valid(x), valid(y)
    s1, s2, s12 = valid(x * x) - mu1**2, valid(y * y) - mu2**2, valid(x * y) - mu1 * mu2
    cs = np.maximum((2 * s12 + c2) / (s1 + s2 + c2), 0)
    return float((((2 * mu1 * mu2 + c1) / (mu1**2 + mu2**2 + c1)) * cs).mean())


def pyiqa_psnr(a: np.ndarray, b: np.ndarray, y_channel: bool) -> float:
    """pyiqa's psnr(x, y, test_y_channel, data_range=1.0, eps=1e-8, color_space='ycbcr'): float32, Y not rounded."""
    if y_channel:
        weights = np.array([65.481, 128.553, 24.966], np.float32)
        x, y = (((image.astype(np.float32) / np.float32(255)) @ weights + np.float32(16)) / np.float32(255) for image in (a, b))
    else:
        x, y = (image.astype(np.float32) / np.float32(255) for image in (a, b))
    return float(10 * np.log10(1.0 / (np.mean((x - y) ** 2, dtype=np.float64) + 1e-8)))


def promptir_psnr_ssim(restored: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    """PromptIR's compute_psnr_ssim on one image pair (its tensors: float32 [0, 1], clipped; HWC for scikit-image)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    restored, clean = (np.clip(image.astype(np.float32) / 255.0, 0, 1) for image in (restored, clean))
    return (
        peak_signal_noise_ratio(clean, restored, data_range=1),
        structural_similarity(clean, restored, data_range=1, channel_axis=-1),
    )


REFERENCES = {
    "basicsr": lambda a, b, crop: (basicsr_psnr(a, b, crop), basicsr_ssim(a, b, crop)),
    "pyiqa": lambda a, b, crop: (pyiqa_psnr(_crop(a, crop), _crop(b, crop), False), pyiqa_ssim(_crop(a, crop), _crop(b, crop), "yiq")),
    "refir": lambda a, b, crop: (pyiqa_psnr(_crop(a, crop), _crop(b, crop), True), pyiqa_ssim(_crop(a, crop), _crop(b, crop), "ycbcr")),
    "promptir": lambda a, b, crop: promptir_psnr_ssim(_crop(a, crop), _crop(b, crop)),
}


def noisy_pair(sigma: float, shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = cv2.GaussianBlur(rng.integers(0, 255, (*shape, 3), dtype=np.uint8), (5, 5), 2)
    noisy = np.clip(target.astype(int) + rng.normal(0, sigma, target.shape), 0, 255).astype(np.uint8)
    return noisy, target


@pytest.fixture
def pair():
    return noisy_pair(12, (72, 80))


def test_psnr_of_a_known_mse_and_ssim_of_an_image_with_itself():
    target = np.full((32, 32, 3), 100, np.uint8)
    output = target.copy()
    output[::2] += 10  # half the pixels off by 10 in every channel: MSE 50 in RGB
    assert psnr(output, target, MetricConvention("promptir")) == pytest.approx(10 * math.log10(255**2 / 50), abs=1e-4)
    assert psnr(target, target, BASICSR) == math.inf
    assert psnr(target, target, MetricConvention("pyiqa")) == pytest.approx(80.0)  # pyiqa's eps 1e-8 in the MSE
    assert all(ssim(target, target, MetricConvention(name)) == pytest.approx(1.0, abs=1e-9) for name in CONVENTIONS)


@pytest.mark.parametrize("sigma, shape, crop", [(3, (256, 256), 0), (12, (72, 80), 4), (30, (97, 131), 0), (30, (64, 48), 2)])
@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_each_convention_equals_its_reference_implementation(name, sigma, shape, crop):
    noisy, target = noisy_pair(sigma, shape, seed=int(sigma))
    noisy[:12, :20] = 255 - target[:12, :20]  # an inverted patch: negative contrast terms (pyiqa clamps them)
    convention = MetricConvention(name, crop)
    expected_psnr, expected_ssim = REFERENCES[name](noisy, target, crop)
    assert psnr(noisy, target, convention) == pytest.approx(expected_psnr, abs=1e-4)
    # 1e-5: pyiqa rounds a float32 luma; one within float32 error of .5 rounds either way with the order of the sum
    # (torch's matmul here, numpy's in the re-expression). The departures this guards against are 2e-4 and more.
    assert ssim(noisy, target, convention) == pytest.approx(expected_ssim, abs=1e-5)


def test_the_conventions_give_different_numbers_on_the_same_pair(pair):
    noisy, target = pair
    scores = {name: (psnr(noisy, target, MetricConvention(name)), ssim(noisy, target, MetricConvention(name))) for name in CONVENTIONS}
    assert len({round(s, 5) for _, s in scores.values()}) == len(CONVENTIONS)
    # PSNR has two colour spaces between them: RGB (pyiqa, promptir) and the studio-range Y (basicsr, refir)
    assert scores["pyiqa"][0] == pytest.approx(scores["promptir"][0], abs=1e-4)
    assert scores["basicsr"][0] == pytest.approx(scores["refir"][0], abs=1e-4)
    assert abs(scores["basicsr"][0] - scores["pyiqa"][0]) > 0.1
    with pytest.raises(ValueError, match="unknown metric convention 'matlab'"):
        MetricConvention("matlab")


def test_unequal_sizes_are_refused(pair):
    noisy, target = pair
    with pytest.raises(ValueError, match="differ in size"):
        psnr(noisy[:-1], target)


# Learned metrics from local files (tiny random weights: the scores mean nothing, the loading and scoring are real).


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from tests.metric_weights import inception_torchscript, openai_clip_torchscript, squeezenet_weights

    root = tmp_path_factory.mktemp("metric-weights")
    return {
        "lpips": squeezenet_weights(root / "squeezenet.safetensors"),
        "lpips_other": squeezenet_weights(root / "squeezenet-other.safetensors", seed=1),
        "fid": inception_torchscript(root / "inception"),
        "clipiqa": openai_clip_torchscript(root / "RN50.pt"),
    }


def noise(seed: int, shape=(48, 64, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def test_lpips_loads_the_backbone_from_the_given_file_and_never_downloads(weights, tmp_path, monkeypatch):
    from restoration.evaluation.learned import build_scorer

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))  # a download would land here: nothing may
    score = build_scorer("lpips", weights["lpips"], lpips_net="squeeze")
    a, b = noise(0), noise(1)
    assert score(a, a) == pytest.approx(0.0, abs=1e-6) and score(a, b) > 0
    other = build_scorer("lpips", weights["lpips_other"], lpips_net="squeeze")
    assert other(a, b) != pytest.approx(score(a, b), rel=1e-4)  # the file's weights are what scores
    assert not (tmp_path / "empty-hub").exists()


def test_fid_equals_clean_fids_own_compute_fid_on_folders(weights, tmp_path):
    """Our FID (features one image at a time, as the scoring actors extract them) against clean-fid's compute_fid on
    the same two folders, mode "clean", with the stand-in TorchScript extractor loaded by clean-fid's InceptionV3W."""
    from cleanfid import fid as cleanfid
    from cleanfid.inception_torchscript import InceptionV3W
    from PIL import Image

    from restoration.evaluation.learned import FidFeatures, frechet_distance

    rng = np.random.default_rng(4)
    folders = {name: tmp_path / name for name in ("a", "b")}
    for index in range(10):
        for name, folder in folders.items():
            folder.mkdir(exist_ok=True)
            shape = (40 + 8 * index, 56, 3) if name == "a" else (64, 48 + 4 * index, 3)
            image = cv2.GaussianBlur(rng.integers(0, 255, shape, dtype=np.uint8), (0, 0), 1 + index % 3 + (name == "b") * 2)
            Image.fromarray(image).save(folder / f"{index:02d}.png")
    extractor = InceptionV3W(str(weights["fid"].parent), download=False)
    expected = cleanfid.compute_fid(str(folders["a"]), str(folders["b"]), mode="clean", custom_feat_extractor=extractor,
                                    device=torch.device("cpu"), num_workers=0, verbose=False)  # fmt: skip
    features = FidFeatures(weights["fid"])  # the file itself (any name), as eval.weights.fid takes it
    ours = [np.stack([features(np.asarray(Image.open(path))) for path in sorted(folder.glob("*.png"))]) for folder in folders.values()]
    assert frechet_distance(*ours) == pytest.approx(expected, rel=1e-4) and expected > 0  # each: a 2048 x 2048 sqrtm, ~15 s


def test_fid_over_sets_and_clipiqa_per_image_from_local_files(weights):
    from restoration.errors import InputError
    from restoration.evaluation.learned import build_scorer

    fid = build_scorer("fid", weights["fid"])
    textured = [noise(seed) for seed in range(3)]
    flat = [np.full((48, 64, 3), value, np.uint8) for value in (30, 120, 220)]
    # Its value: equal to clean-fid's in the test above (each value costs a 2048 x 2048 sqrtm, ~20 s on one core).
    with pytest.raises(InputError, match="at least 2 images"):
        fid(flat[:1], textured[:1])
    clipiqa = build_scorer("clipiqa", weights["clipiqa"])
    scores = [clipiqa(image) for image in (textured[0], flat[0])]
    assert all(0.0 <= value <= 1.0 for value in scores) and scores[0] != scores[1]


def test_pyiqas_metrics_from_local_files_equal_pyiqa_scoring_the_image_file_and_never_download(weights, tmp_path, monkeypatch):
    """CLIP-IQA (OpenAI's TorchScript CLIP layout), MUSIQ (a plain checkpoint) and NIQE (a .mat): our scorer on the
    decoded uint8 image against pyiqa's own metric reading the PNG file (its folder mode), with nothing reachable."""
    import urllib.request

    import pyiqa
    from PIL import Image

    from restoration.errors import InputError
    from restoration.evaluation.learned import build_scorer
    from tests.metric_weights import musiq_checkpoint, niqe_parameters

    def no_network(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    image = cv2.GaussianBlur(noise(5, (112, 136, 3)), (0, 0), 1.5)
    Image.fromarray(image).save(tmp_path / "image.png")
    files = {
        "clipiqa": (weights["clipiqa"], {"backbone": str(weights["clipiqa"])}),
        "musiq": (musiq_checkpoint(tmp_path / "musiq.pth"), {"pretrained_model_path": str(tmp_path / "musiq.pth")}),
        "niqe": (niqe_parameters(tmp_path / "niqe.mat"), {"pretrained_model_path": str(tmp_path / "niqe.mat")}),
    }
    for name, (path, options) in files.items():
        ours = build_scorer(name, path)(image)
        theirs = float(pyiqa.create_metric(name, device="cpu", **options)(str(tmp_path / "image.png")))
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6), name
    assert build_scorer("clipiqa", weights["clipiqa"])(np.full((112, 136, 3), 128, np.uint8)) != pytest.approx(
        build_scorer("clipiqa", weights["clipiqa"])(image), abs=1e-6)  # fmt: skip
    with pytest.raises(InputError, match="is not a TorchScript CLIP"):
        build_scorer("clipiqa", files["musiq"][0])  # a plain checkpoint: pyiqa's CLIP loader cannot read one
    assert not (tmp_path / "empty-hub").exists()


def test_a_weights_file_that_is_not_a_plain_state_dict_is_refused(tmp_path):
    from restoration.errors import InputError
    from restoration.evaluation.learned import read_state_dict

    pickled = tmp_path / "model.pth"
    torch.save({"net": torch.nn.Linear(2, 2)}, pickled)  # a pickled module: weights_only=True refuses it
    with pytest.raises(InputError, match="not a safetensors file or a plain torch state dict"):
        read_state_dict(pickled)
    with pytest.raises(InputError, match="does not exist"):
        read_state_dict(tmp_path / "missing.safetensors")


def test_pyiqa_gets_a_copy_of_plain_tensors_never_the_users_pickle(tmp_path):
    """pyiqa unpickles checkpoints (weights_only=False): it is handed a copy written from a weights_only=True read."""
    from restoration.errors import InputError
    from restoration.evaluation.learned import _plain_copy

    nested = tmp_path / "musiq.pth"
    torch.save({"params": {"w": torch.arange(3.0)}}, nested)  # pyiqa's layout: weights under a key
    (tmp_path / "copy").mkdir()
    copy = _plain_copy(nested, tmp_path / "copy")
    assert copy != nested and torch.equal(torch.load(copy, weights_only=True)["params"]["w"], torch.arange(3.0))
    pickled = tmp_path / "module.pth"
    torch.save({"net": torch.nn.Linear(2, 2)}, pickled)
    with pytest.raises(InputError, match="not a plain torch checkpoint of tensors"):
        _plain_copy(pickled, tmp_path / "copy")


def test_metric_plan_skips_what_has_no_weights_and_refuses_what_was_asked_for(tmp_path, monkeypatch):
    from restoration.errors import InputError
    from restoration.evaluation import learned
    from restoration.evaluation.learned import LEARNED, plan_metrics, pyiqa_available

    plan = plan_metrics(None, {}, has_reference=True)
    assert plan.full == ["psnr", "ssim"] and plan.sets == [] and plan.no_reference == []
    assert set(plan.skipped) == set(LEARNED) and "eval.weights.lpips" in plan.skipped["lpips"]
    present = tmp_path / "alexnet.safetensors"
    present.write_bytes(b"")
    plan = plan_metrics(None, {"lpips": str(present), "fid": str(present), "clipiqa": str(tmp_path)}, has_reference=True)
    assert plan.full == ["psnr", "ssim", "lpips"] and plan.sets == ["fid"] and plan.no_reference == ["clipiqa"]
    no_reference = plan_metrics(None, {"clipiqa": str(tmp_path)}, has_reference=False)
    assert no_reference.names == ["clipiqa"] and "HQ reference" in no_reference.skipped["psnr"]
    with pytest.raises(InputError, match=r"asks for lpips, which needs eval\.weights\.lpips"):
        plan_metrics(["psnr", "lpips"], {}, has_reference=True)
    with pytest.raises(InputError, match=r"eval.weights.fid: .*missing.pth does not exist"):
        plan_metrics(None, {"fid": str(tmp_path / "missing.pth")}, has_reference=True)
    with pytest.raises(InputError, match="unknown \\['sharpness'\\]"):
        plan_metrics(["sharpness"], {}, has_reference=True)
    with pytest.raises(InputError, match="asks for psnr, which needs an HQ reference"):
        plan_metrics(["psnr"], {}, has_reference=False)
    with pytest.raises(InputError, match=r"asks for maniqa, which is refused: .*timm.create_model\(\.\.\., pretrained=True\)"):
        plan_metrics(["maniqa"], {"maniqa": str(present)}, has_reference=False)  # even with its file, never run
    assert "refused" in plan_metrics(None, {"maniqa": str(present)}, has_reference=True).skipped["maniqa"]
    assert pyiqa_available()  # the dev install has pyiqa (--no-deps); the core install has not:
    monkeypatch.setattr(learned, "pyiqa_available", lambda: False)
    plan = plan_metrics(None, {"musiq": str(present), "clipiqa": str(present)}, has_reference=True)
    assert "restoray[iqa]" in plan.skipped["musiq"] and "restoray[iqa]" in plan.skipped["clipiqa"]
    with pytest.raises(InputError, match=r"asks for clipiqa, which needs pyiqa, an optional extra"):
        plan_metrics(["clipiqa"], {"clipiqa": str(present)}, has_reference=False)


def test_held_out_protocol_chains_degradations_per_case_seeded():
    from restoration.evaluation.protocols import load_protocol

    protocol = load_protocol("abair-heldout")
    hq = noise(3, (64, 64, 3))
    cases = {case: protocol.degrade(hq, "a.png", case) for case in protocol.cases()}
    assert {case: [op["op"] for op in ops] for case, (_, _, ops) in cases.items()} == {
        "jpeg": ["jpeg"],
        "blur+noise": ["blur", "noise"],
        "blur+jpeg": ["blur", "jpeg"],
    }
    again = protocol.degrade(hq, "a.png", "blur+noise")
    assert np.array_equal(again[1], cases["blur+noise"][1]) and not np.array_equal(cases["blur+noise"][1], hq)
