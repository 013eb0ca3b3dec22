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


def clip_folder(path: Path) -> Path:
    """A tiny Hugging Face CLIP (model and processor) saved as a local folder, with CLIP's real BPE vocabulary."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from restoration.models.base import open_clip_bpe_vocabulary

    vocab, merges = open_clip_bpe_vocabulary()
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tiny, "vocab_size": len(vocab), "max_position_embeddings": 77},
        vision_config={**tiny, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges),
    )
    processor.save_pretrained(path)
    return path
