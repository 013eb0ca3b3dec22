"""Tiny random weights files for the learned metrics, in the formats their users pass (`eval.weights.*`): no hub,
no download. Random weights give meaningless scores, which is enough to show the files are loaded and scored."""

from __future__ import annotations

from pathlib import Path

import torch


def squeezenet_weights(path: Path, seed: int = 0) -> Path:
    """torchvision's SqueezeNet 1.1 with random weights as safetensors (the backbone of LPIPS's 'squeeze' net)."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    save_file(torchvision.models.squeezenet1_1(weights=None).state_dict(), str(path))
    return path


def inception_torchscript(folder: Path, seed: int = 0) -> Path:
    """A stand-in for NVIDIA's TorchScript InceptionV3 as clean-fid's InceptionV3W uses it (`base.layers` maps a
    normalised 299 x 299 batch to 2048 features), small and random, saved as <folder>/inception-2015-12-05.pt."""
    from torch import nn

    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 9, stride=8)
            self.project = nn.Linear(16 * 4, 2048)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2)
            return self.project(pooled.flatten(1))

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.layers((x - 128) / 128)

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "inception-2015-12-05.pt"
    torch.jit.script(Base()).save(str(path))
    return path


def openai_clip_torchscript(path: Path, seed: int = 0) -> Path:
    """A tiny CLIP in OpenAI's TorchScript layout (what OpenAI's RN50.pt is: a traced ModifiedResNet CLIP), random,
    with CLIP's real vocabulary size (pyiqa tokenises its prompts with openai-clip's BPE); for pyiqa's CLIP-IQA."""
    import clip
    from clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1).eval()  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.trace(model, (torch.rand(1, 3, 64, 64), clip.tokenize(["a photo"])), check_trace=False).save(str(path))
    return path


def musiq_checkpoint(path: Path, seed: int = 0) -> Path:
    """pyiqa's MUSIQ (its KonIQ layout: one output) with random weights, saved as a plain state dict."""
    from pyiqa.archs.musiq_arch import MUSIQ

    torch.manual_seed(seed)
    torch.save(MUSIQ(num_class=1, pretrained=False).state_dict(), path)
    return path


def niqe_parameters(path: Path, seed: int = 0) -> Path:
    """NIQE's pristine-model parameters as pyiqa reads them (a .mat: mu_prisparam 1 x 36, cov_prisparam 36 x 36)."""
    import numpy as np
    import scipy.io

    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(36, 36))
    scipy.io.savemat(path, {"mu_prisparam": rng.normal(size=(1, 36)), "cov_prisparam": basis @ basis.T / 36 + np.eye(36)})
    return path
