"""Metrics that need trained weights: LPIPS and DISTS from torchmetrics, FID from clean-fid, CLIP-IQA, MUSIQ, MANIQA
and NIQE from pyiqa (an optional extra: `pip install restoray[iqa]`). Each takes a local weights file (`eval.weights.<name>`) and
nothing is ever downloaded: a metric without its file is skipped and says which file it needs.

The torchvision backbones (LPIPS's AlexNet/VGG/SqueezeNet, DISTS's VGG16) are loaded by torchmetrics through
torchvision's own weight enums, which fetch into torch.hub's cache. We load the user's file ourselves (safetensors, or
a state dict through `torch.load(weights_only=True)`), write the tensors under the file name torchvision looks for in
a private hub directory, and point torch.hub there while the metric is built: torchvision finds the file and never
downloads, and what it unpickles is a plain tensor dict we wrote.

FID is clean-fid's (Parmar et al.; the folder FID papers print): each image resized to 299 x 299 by PIL's bicubic on
float channels (`mode="clean"`), NVIDIA's TorchScript InceptionV3 (`inception-2015-12-05.pt`, loaded by clean-fid's
`InceptionV3W(folder, download=False)`), `fid_from_feats` over the two feature sets. `torch.jit.load` runs code the
file carries: that file is accepted only from `eval.weights.fid`, which the user sets, never fetched or looked up.

CLIP-IQA is pyiqa's (the one SUPIR and ReFIR report): OpenAI's CLIP RN50 with the attention pool's positional embedding
off (any image size), five antonym prompt pairs, the positive prompt's softmax probability averaged over them. pyiqa
builds its CLIP with `clip_model.load(backbone)`: the name 'RN50' is fetched into torch.hub's cache, a file path is
read as it is. restoray passes the path of `eval.weights.clipiqa`, OpenAI's `RN50.pt`, a TorchScript archive (as for
FID, `torch.jit.load` runs code the file carries: a file you trust; pyiqa then rebuilds its own CLIP from the
archive's tensors). pyiqa's other branch, a plain state dict, cannot work: it reads the file object the failed
`torch.jit.load` left at its end.

A scorer's inputs are H x W x 3 uint8 RGB images (the borders cropped by the protocol's convention; learned metrics
score RGB, never the Y channel)."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from restoration.errors import InputError
from restoration.evaluation.metrics import PLAIN_METRICS

logger = logging.getLogger(__name__)

Kind = Literal["full", "no_reference", "set"]


@dataclass(frozen=True)
class LearnedMetric:
    name: str
    kind: Kind  # full: per image against the HQ; no_reference: per image alone; set: outputs against HQs as sets
    needs: str  # the file `eval.weights.<name>` must point at
    higher_is_better: bool
    extra: str | None = None  # the optional dependency it needs, if any
    refused: str | None = None  # why it is never run (its library would download whatever file it is given)


_METRICS = (
    LearnedMetric(
        "lpips", "full", "torchvision ImageNet weights of the LPIPS backbone (eval.lpips_net; alex: alexnet-owt-7be5be79.pth)", False
    ),
    LearnedMetric("dists", "full", "torchvision ImageNet VGG16 weights (vgg16-397923af.pth)", False),
    LearnedMetric(
        "fid",
        "set",
        "NVIDIA's TorchScript InceptionV3, clean-fid's (inception-2015-12-05.pt; a file you trust: loading runs its code)",
        False,
    ),
    LearnedMetric(
        "clipiqa",
        "no_reference",
        "OpenAI's CLIP RN50 as pyiqa's CLIP-IQA loads it (RN50.pt, TorchScript; a file you trust: loading runs its code)",
        True,
        "pyiqa",
    ),
    LearnedMetric("musiq", "no_reference", "pyiqa's MUSIQ weights (musiq_koniq_ckpt-e95806b9.pth)", True, "pyiqa"),
    LearnedMetric(
        "maniqa",
        "no_reference",
        "pyiqa's MANIQA weights (ckpt_koniq10k.pt)",
        True,
        "pyiqa",
        refused="pyiqa's MANIQA builds its ViT with timm.create_model(..., pretrained=True), a download, even when given a local "
        "weights file; restoray never downloads, so it is not run",
    ),
    LearnedMetric("niqe", "no_reference", "pyiqa's NIQE parameters (niqe_modelparameters.mat)", False, "pyiqa"),
)
LEARNED = {metric.name: metric for metric in _METRICS}
LPIPS_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}  # torchvision enums


@dataclass(frozen=True)
class MetricPlan:
    full: list[str]  # per image against the HQ (psnr, ssim first)
    no_reference: list[str]  # per image alone
    sets: list[str]  # over the whole test set
    skipped: dict[str, str]  # name: why, and the file or extra it needs

    @property
    def names(self) -> list[str]:
        return [*self.full, *self.no_reference, *self.sets]


KNOWN = (*PLAIN_METRICS, *LEARNED)


def plan_metrics(requested: list[str] | None, weights: dict[str, str | None], has_reference: bool) -> MetricPlan:
    """What a run scores. Unset `requested`: psnr and ssim, and every learned metric whose weights are set, the rest
    skipped with the file they need. A metric named in `requested` must be usable: unknown, without its weights file,
    needing the pyiqa extra that is not installed, or needing an HQ the protocol lacks, it is an InputError."""
    explicit = requested is not None
    unknown = [name for name in requested or [] if name not in KNOWN]
    if unknown:
        raise InputError(f"eval.metrics: unknown {unknown}; known: {', '.join(KNOWN)}")
    full, no_reference, sets, skipped = [], [], [], {}
    for name in requested if explicit else KNOWN:
        metric = LEARNED.get(name)
        kind = metric.kind if metric else "full"
        reason = None
        if metric and metric.refused:
            reason = f"is refused: {metric.refused}"
        elif kind != "no_reference" and not has_reference:
            reason = "needs an HQ reference, which a no-reference protocol has not"
        elif metric and not weights.get(name):
            reason = f"needs eval.weights.{name}: {metric.needs}"
        elif metric and not Path(weights[name]).exists():
            raise InputError(f"eval.weights.{name}: {weights[name]} does not exist ({name} needs {metric.needs})")
        elif metric and metric.extra == "pyiqa" and not pyiqa_available():
            reason = "needs pyiqa, an optional extra: pip install 'restoray[iqa]'"
        if reason is None:
            {"full": full, "no_reference": no_reference, "set": sets}[kind].append(name)
        elif explicit:
            raise InputError(f"eval.metrics asks for {name}, which {reason}")
        else:
            skipped[name] = reason
    if not (full or no_reference or sets):
        reasons = "; ".join(f"{name} {why}" for name, why in skipped.items())
        raise InputError(f"no metric can be scored: {reasons}")
    return MetricPlan(full, no_reference, sets, skipped)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors: safetensors, or a (possibly nested under 'state_dict') torch state dict read with
    weights_only=True."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and format errors all mean: not a plain state dict
        raise InputError(f"weights file {path}: not a safetensors file or a plain torch state dict ({err})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"weights file {path}: not a state dict of tensors")
    return state


@contextlib.contextmanager
def _staged_torchvision(weights_enum: str, path: str | Path) -> Iterator[None]:
    """torch.hub pointed at a private directory holding `path`'s tensors under the file name torchvision expects for
    `weights_enum` (e.g. 'AlexNet_Weights.IMAGENET1K_V1')."""
    from torchvision.models import get_weight

    file_name = get_weight(weights_enum).url.rsplit("/", 1)[-1]
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory(prefix="restoray-weights-") as hub:
        (Path(hub) / "checkpoints").mkdir()
        torch.save(read_state_dict(path), Path(hub) / "checkpoints" / file_name)
        torch.hub.set_dir(hub)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)


def _to_unit(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


FullScorer = Callable[[np.ndarray, np.ndarray], float]
NoReferenceScorer = Callable[[np.ndarray], float]
SetScorer = Callable[[Iterable[np.ndarray], Iterable[np.ndarray]], float]


def build_scorer(name: str, weights: str | Path, lpips_net: str = "alex", device: str = "cpu"):
    """The scorer of a learned metric from its local weights (InputError when the file or the extra is missing):
    full (output, hq) -> float, no_reference (output) -> float, set (outputs, hqs) -> float."""
    if name not in LEARNED:
        raise InputError(f"unknown learned metric {name!r}; known: {', '.join(LEARNED)}")
    if LEARNED[name].refused:
        raise InputError(f"{name} is refused: {LEARNED[name].refused}")
    if not Path(weights).exists():
        raise InputError(f"eval.weights.{name}: {weights} does not exist ({name} needs {LEARNED[name].needs})")
    return _BUILDERS[name](Path(weights), lpips_net, torch.device(device))


def _lpips(weights: Path, lpips_net: str, device: torch.device) -> FullScorer:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    if lpips_net not in LPIPS_WEIGHTS:
        raise InputError(f"eval.lpips_net: {lpips_net!r}; known: {', '.join(LPIPS_WEIGHTS)}")
    with _staged_torchvision(f"{LPIPS_WEIGHTS[lpips_net]}.IMAGENET1K_V1", weights):
        metric = LearnedPerceptualImagePatchSimilarity(net_type=lpips_net, normalize=True).to(device)

    @torch.no_grad()
    def score(output: np.ndarray, hq: np.ndarray) -> float:
        metric.reset()
        return float(metric(_to_unit([output]).to(device), _to_unit([hq]).to(device)))

    return score


def _dists(weights: Path, lpips_net: str, device: torch.device) -> FullScorer:
    from torchmetrics.functional.image.dists import DISTSNetwork

    with _staged_torchvision("VGG16_Weights.IMAGENET1K_V1", weights):
        network = DISTSNetwork().to(device).eval()  # its alpha/beta are bundled with torchmetrics

    @torch.no_grad()
    def score(output: np.ndarray, hq: np.ndarray) -> float:
        return float(network(_to_unit([output]).to(device), _to_unit([hq]).to(device), require_grad=False).mean())

    return score


FID_FILE = "inception-2015-12-05.pt"  # the name clean-fid's InceptionV3W loads from its folder


class FidFeatures:
    """clean-fid's features of one image (2048 float32): `mode="clean"` resize, then the TorchScript InceptionV3."""

    def __init__(self, weights: str | Path, device: torch.device | str = "cpu"):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        weights = Path(weights)
        if not weights.exists():
            raise InputError(f"eval.weights.fid: {weights} does not exist ({LEARNED['fid'].needs})")
        self.device = torch.device(device)
        with tempfile.TemporaryDirectory(prefix="restoray-fid-") as folder:
            if weights.is_dir():
                folder = str(weights)
            else:  # InceptionV3W reads <folder>/inception-2015-12-05.pt: the user's file under that name
                (Path(folder) / FID_FILE).symlink_to(weights.resolve())
            try:
                self.model = InceptionV3W(folder, download=False).to(self.device).eval()
            except (RuntimeError, ValueError, FileNotFoundError) as err:
                raise InputError(f"eval.weights.fid: {weights} is not a TorchScript InceptionV3 ({err})") from None
        self.resize = build_resizer("clean")

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        resized = self.resize(image)  # H x W x 3 float32 on 0-255, 299 x 299
        batch = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))[None].to(self.device)
        return self.model(batch)[0].float().cpu().numpy()


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """clean-fid's `fid_from_feats` over two N x 2048 feature sets."""
    from cleanfid.fid import fid_from_feats

    for features in (features_a, features_b):
        if len(features) < 2:
            raise InputError(f"fid needs at least 2 images, the test set has {len(features)}")
    return float(fid_from_feats(np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)))


def _fid(weights: Path, lpips_net: str, device: torch.device) -> SetScorer:
    features = FidFeatures(weights, device)

    def score(outputs: Iterable[np.ndarray], hqs: Iterable[np.ndarray]) -> float:
        """Fed one image at a time (the images may differ in size, and a set need not fit in memory)."""
        pairs = [(features(output), features(hq)) for output, hq in zip(outputs, hqs, strict=True)]
        return frechet_distance(np.array([a for a, _ in pairs]), np.array([b for _, b in pairs]))

    return score


# The sha256 in OpenAI's URL for RN50.pt, which pyiqa's own download checks: another file scores, but not as papers do.
OPENAI_RN50_SHA256 = "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"


def _clipiqa(weights: Path, lpips_net: str, device: torch.device) -> NoReferenceScorer:
    import hashlib
    import zipfile

    pyiqa = _import_pyiqa("clipiqa")
    torchscript = weights.is_file() and zipfile.is_zipfile(weights)
    if torchscript:
        with zipfile.ZipFile(weights) as archive:  # TorchScript: a zip with <name>/constants.pkl beside the tensors
            torchscript = any(name.endswith("/constants.pkl") for name in archive.namelist())
    if not torchscript:
        raise InputError(f"eval.weights.clipiqa: {weights} is not a TorchScript CLIP ({LEARNED['clipiqa'].needs})")
    try:
        import clip  # noqa: F401  (openai-clip: pyiqa's CLIP-IQA tokenises its prompts with it)
    except ImportError as err:
        raise InputError(
            f"clipiqa needs openai-clip, a pyiqa dependency, importable ({err}); openai-clip 1.0.1 imports pkg_resources, "
            "which setuptools 82 removed: pip install 'setuptools<82'"
        ) from None
    with weights.open("rb") as file:
        if hashlib.file_digest(file, "sha256").hexdigest() != OPENAI_RN50_SHA256:
            logger.warning("eval.weights.clipiqa: %s is not OpenAI's RN50.pt: its CLIP-IQA will not compare with papers'", weights)
    with contextlib.redirect_stdout(io.StringIO()):  # pyiqa prints as it loads
        metric = pyiqa.create_metric("clipiqa", device=device, as_loss=False, backbone=str(weights))
    return _no_reference_scorer(metric, device)


def _no_reference_scorer(metric, device: torch.device) -> NoReferenceScorer:
    """A pyiqa no-reference metric on one uint8 image: RGB in [0, 1], as pyiqa's own loader gives it."""

    @torch.no_grad()
    def score(output: np.ndarray) -> float:
        return float(metric(_to_unit([output]).to(device)))

    return score


def _import_pyiqa(name: str):
    try:
        import pyiqa
    except ImportError:
        raise InputError(f"{name} needs pyiqa, an optional extra: pip install 'restoray[iqa]'") from None
    return pyiqa


def _pyiqa(name: str):
    def build(weights: Path, lpips_net: str, device: torch.device) -> NoReferenceScorer:
        pyiqa = _import_pyiqa(name)
        with tempfile.TemporaryDirectory(prefix="restoray-pyiqa-") as folder, contextlib.redirect_stdout(io.StringIO()):
            # pyiqa reads a checkpoint with torch.load(weights_only=False), i.e. unpickles it: it gets a copy we wrote
            # from what weights_only=True could read (tensors in dicts), never the user's file itself. NIQE's .mat
            # parameters are read by scipy, not unpickled.
            metric = pyiqa.create_metric(name, device=device, as_loss=False, pretrained_model_path=str(_plain_copy(weights, Path(folder))))
        return _no_reference_scorer(metric, device)

    return build


def _plain_copy(weights: Path, folder: Path) -> Path:
    if weights.suffix == ".mat":
        return weights
    try:
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and format errors all mean: not plain tensors
        raise InputError(f"weights file {weights}: not a plain torch checkpoint of tensors ({err})") from None
    copy = folder / weights.name
    torch.save(checkpoint, copy)
    return copy


def pyiqa_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyiqa") is not None


_BUILDERS = {"lpips": _lpips, "dists": _dists, "fid": _fid, "clipiqa": _clipiqa, **{n: _pyiqa(n) for n in ("musiq", "maniqa", "niqe")}}
