"""Half precision (`restore.dtype`): networks held and run in bf16/fp16, what must stay fp32 stays fp32, and a bf16
restore lands within a stated distance of the fp32 one."""

import numpy as np
import pytest
import torch
from PIL import Image

from restoration.precision import resolve_dtype
from restoration.restorer import Restorer
from restoration.settings import RestoreConfig, SamplerConfig

# Measured on the tiny preset with a perturbed adaptor, 4 steps at 64 px: about 47 dB between the bf16 and fp32
# restorations (fp16: about 59 dB). Asserted with a margin.
BF16_MIN_PSNR_DB = 35.0


def _psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255.0**2 / max(((x - y) ** 2).mean(), 1e-12)))


@pytest.fixture(scope="module")
def trained_state():
    """A tiny adaptor whose connectors do something (zero-initialised ones change nothing)."""
    restorer = Restorer("tiny")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in restorer.model.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return restorer.trained_state()


@pytest.fixture(scope="module")
def image():
    import skimage.data

    return Image.fromarray(skimage.data.chelsea()).resize((64, 64))


def _restorer(dtype: str, state) -> Restorer:
    restorer = Restorer.from_pretrained("tiny", device="cpu", dtype=dtype)
    restorer.load_trained_state(state, "perturbed")
    return restorer


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError):
        RestoreConfig(dtype="int8")


def test_bf16_restore_is_within_the_stated_distance_of_fp32(trained_state, image):
    sampler = SamplerConfig(steps=4)
    reference = _restorer("fp32", trained_state).restore(image, prompt="a cat", sampler=sampler)
    half = _restorer("bf16", trained_state)
    networks = half.networks
    for module in (half.model, networks.unet, networks.vae, half.encoder, networks.text_encoder, networks.text_encoder_2):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    restored = half.restore(image, prompt="a cat", sampler=sampler)
    distance = _psnr(restored.image, reference.image)
    assert BF16_MIN_PSNR_DB <= distance < 99, distance  # close, and not the same computation
    # The sampler's arithmetic stays fp32: the step callback sees fp32 latents.
    seen = []
    half.restore(image, prompt="a cat", sampler=SamplerConfig(steps=2), on_step=lambda info: seen.append(info.x0.dtype))
    assert seen == [torch.float32, torch.float32]
    # Tiled diffusion, the tiled VAE and ReFIR's reference chain run in bf16 too.
    tiled = half.restore(image.resize((160, 96)), prompt="a cat", sampler=sampler, options=RestoreConfig(tile_latent=8, tile_overlap=4))
    assert tiled.image.size == (160, 96)
    assert half.restore(image, prompt="a cat", sampler=sampler, references=[image]).references


def test_fp16_keeps_the_vae_in_fp32_where_fp16_overflows(trained_state):
    restorer = _restorer("fp16", trained_state)
    assert restorer.dtype == torch.float16 and restorer.networks.text_encoder.dtype == torch.float16
    assert {p.dtype for p in restorer.networks.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in restorer.encoder.parameters()} == {torch.float32}
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 3e4 * restorer.networks.vae.config.scaling_factor
    fp16_vae = Restorer("tiny").networks.vae.half()
    with torch.no_grad():
        overflowed = fp16_vae.decode((latent / fp16_vae.config.scaling_factor).half()).sample
    assert not torch.isfinite(overflowed).all()  # this input overflows an fp16 VAE
    for options in (RestoreConfig(tile_latent=None), RestoreConfig(tile_latent=8, tile_overlap=4)):
        with torch.no_grad():
            decoded = restorer._decode(latent, options)
        assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()


def test_attention_runs_through_sdpa():
    restorer = Restorer("tiny")
    processors = {
        type(p).__name__ for p in [*restorer.networks.unet.attn_processors.values(), *restorer.networks.vae.attn_processors.values()]
    }
    assert processors == {"AttnProcessor2_0"}  # diffusers' F.scaled_dot_product_attention processor


def test_offload_moves_each_network_group_only_for_its_phase(monkeypatch):
    restorer = Restorer("tiny")
    moves: list[tuple[str, str]] = []
    networks = {
        "unet+adaptor": restorer.model,
        "vae": restorer.networks.vae,
        "robust encoder": restorer.encoder,
        "text_encoder": restorer.networks.text_encoder,
        "text_encoder_2": restorer.networks.text_encoder_2,
    }
    for name, module in networks.items():
        monkeypatch.setattr(module, "to", lambda device, name=name: moves.append((name, str(device))))
    monkeypatch.setattr(Restorer, "device", property(lambda self: torch.device("cuda")))  # as on a GPU

    def visits(offload: str, group: str) -> list[tuple[str, str]]:
        restorer.offload = offload
        moves.clear()
        with restorer._on_device(group):
            inside = list(moves)
        return [*inside, ("--", "--"), *moves[len(inside) :]]

    assert visits("model", "text") == [
        ("text_encoder", "cuda"), ("text_encoder_2", "cuda"), ("--", "--"), ("text_encoder", "cpu"), ("text_encoder_2", "cpu")
    ]  # fmt: skip
    assert visits("model", "model") == visits("model", "vae") == visits("none", "text") == [("--", "--")]
    assert visits("all", "model") == [("unet+adaptor", "cuda"), ("--", "--"), ("unet+adaptor", "cpu")]
    assert visits("all", "vae") == [("vae", "cuda"), ("robust encoder", "cuda"), ("--", "--"), ("vae", "cpu"), ("robust encoder", "cpu")]
    with pytest.raises(Exception, match="offload 'some'"):
        restorer.to("cpu", offload="some")


def test_offloaded_restores_equal_the_resident_one(trained_state, image):
    """On the CPU the moves are no-ops; what this checks is that every phase finds its networks where it runs."""
    sampler = SamplerConfig(steps=2)
    resident = _restorer("fp32", trained_state).restore(image, prompt="a cat", sampler=sampler)
    for offload in ("model", "all"):
        restorer = Restorer.from_pretrained("tiny", device="cpu", offload=offload)
        restorer.load_trained_state(trained_state, "perturbed")
        assert np.array_equal(np.asarray(restorer.restore(image, prompt="a cat", sampler=sampler).image), np.asarray(resident.image))
