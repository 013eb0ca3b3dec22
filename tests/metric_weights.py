"""Tiny random weights files for the learned metrics, in the formats their users pass (`eval.weights.*`): no hub,
no download. Random weights give meaningless scores, which is enough to show the files are loaded and scored."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def squeezenet_weights(path: Path, seed: int = 0) -> Path:
    """torchvision's SqueezeNet 1.1 with random weights as safetensors (the backbone of LPIPS's 'squeeze' net)."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    save_file(torchvision.models.squeezenet1_1(weights=None).state_dict(), str(path))
    return path


def inception_weights(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's FID InceptionV3, random (He-scaled so its 2048 features vary with the image), saved as a
    plain state dict. torch-fidelity only builds the network from a weights file, so it is built once with loading
    turned off to learn the names and shapes."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    load = torch.nn.Module.load_state_dict
    torch.nn.Module.load_state_dict = lambda self, *args, **kwargs: None
    try:
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        torch.nn.Module.load_state_dict = load
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in network.state_dict().items():
        if name.endswith("weight") and value.ndim == 4:
            value = torch.randn(value.shape, generator=generator) * math.sqrt(2.0 / value[0].numel())
        elif name.endswith("running_var"):
            value = torch.ones_like(value)
        elif name.endswith("running_mean"):
            value = torch.zeros_like(value)
        state[name] = value.contiguous()
    torch.save(state, path)
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
