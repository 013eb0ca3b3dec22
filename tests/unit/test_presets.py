import time

import numpy as np
import pytest
import torch
from PIL import Image

from restoration.errors import PresetError
from restoration.models.base import (
    encode_prompt,
    load_captioner,
    load_clip_scorer,
    load_sdxl,
    open_clip_bpe_vocabulary,
    save_sdxl,
    size_crop_time_ids,
)
from restoration.models.presets import Preset, add_preset_file, list_presets, load_preset


@pytest.fixture(scope="module")
def tiny():
    return load_preset("tiny")


@pytest.fixture(scope="module")
def tiny_sdxl(tiny):
    return load_sdxl(tiny).frozen()


def test_registry_lists_tiny_and_sdxl_with_every_network():
    presets = {p.name: p for p in list_presets()}
    assert {"tiny", "sdxl"} <= set(presets)
    expected = {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "captioner", "clip_scorer"}
    for preset in presets.values():
        assert set(preset.networks()) == expected
    sdxl = presets["sdxl"]
    assert sdxl.unet.source == "stabilityai/stable-diffusion-xl-base-1.0" and sdxl.unet.subfolder == "unet"
    assert sdxl.captioner.pretrained and sdxl.clip_scorer.pretrained == "openai"
    assert all(spec.config is None for spec in (sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2))


def test_unknown_preset_and_invalid_file(tmp_path):
    with pytest.raises(PresetError, match=r"unknown preset 'tinyy'.*tiny"):
        load_preset("tinyy")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\ndescription = "x"\n[unet]\nsource = "a/b"\nconfig = {}\n')
    with pytest.raises(PresetError, match=r"unet: .*exactly one of"):
        load_preset(str(bad))


def test_open_clip_vocabulary_matches_clip_ids(tiny_sdxl):
    vocab, merges = open_clip_bpe_vocabulary()
    assert len(merges) == 49152 - 256 - 2
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    # CLIP's published ids for "a photo of a cat".
    assert tiny_sdxl.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tiny_sdxl.tokenizer_2.pad_token == "!"


def test_tiny_builds_seeded_and_fast(tiny):
    started = time.monotonic()
    first = load_sdxl(tiny)
    assert time.monotonic() - started < 60
    second = load_sdxl(tiny)
    for a, b in zip(first.unet.parameters(), second.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    # Networks get different seeds: the two text encoders are not copies of each other.
    assert not torch.equal(first.text_encoder.get_input_embeddings().weight, first.text_encoder_2.get_input_embeddings().weight)
    # Building does not disturb the caller's RNG.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_sdxl(tiny)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_sdxl_conditioning_runs_through_the_unet(tiny_sdxl):
    prompt_embeds, pooled = encode_prompt(tiny_sdxl, ["a cat", "a photo of a dog"])
    assert prompt_embeds.shape == (2, 77, tiny_sdxl.unet.config.cross_attention_dim)
    assert pooled.shape == (2, 32)
    latents = torch.randn(2, 4, 16, 16)
    time_ids = size_crop_time_ids((128, 128), (0, 0), (128, 128), batch=2)
    out = tiny_sdxl.unet(
        latents,
        torch.tensor([10, 500]),
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
    ).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
    # Different prompts condition differently.
    assert not torch.allclose(prompt_embeds[0], prompt_embeds[1])
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    latent = tiny_sdxl.vae.encode(image).latent_dist.mean
    assert latent.shape == (1, 4, 8, 8)
    assert tiny_sdxl.vae.decode(latent).sample.shape == image.shape
    assert not any(p.requires_grad for p in tiny_sdxl.unet.parameters())


def test_sdxl_layout_loads_from_a_local_path(tmp_path, tiny, tiny_sdxl):
    """The same from_pretrained code that loads the real SDXL, pointed at a local directory."""
    save_sdxl(tiny_sdxl, tmp_path / "sdxl-local")
    data = load_preset("sdxl").model_dump()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        data[name]["source"] = str(tmp_path / "sdxl-local")
    data["name"] = "sdxl-local"
    local = Preset.model_validate(data)
    loaded = load_sdxl(local)
    for a, b in zip(loaded.unet.parameters(), tiny_sdxl.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert loaded.tokenizer("a cat").input_ids == tiny_sdxl.tokenizer("a cat").input_ids


def test_preset_file_by_path_and_registration(tmp_path):
    source = load_preset("tiny").model_dump(exclude_none=True)
    source["name"] = "tiny-copy"
    path = tmp_path / "tiny-copy.toml"
    path.write_text(_to_toml(source))
    assert load_preset(str(path)).name == "tiny-copy"
    assert add_preset_file(path) == "tiny-copy"
    assert "tiny-copy" in {p.name for p in list_presets()}


def test_tiny_captioner_generates_text(tiny):
    captioner = load_captioner(tiny.captioner, tiny.tokenizer, seed=tiny.seed)
    image = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8"))
    inputs = captioner.processor(images=[image], text=["<image> " + captioner.prompt], return_tensors="pt")
    generated = captioner.model.generate(**inputs, max_new_tokens=captioner.max_new_tokens, do_sample=False)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    assert new_tokens.shape[1] >= 1
    assert isinstance(captioner.processor.batch_decode(new_tokens, skip_special_tokens=True)[0], str)


def test_tiny_clip_scorer_embeds_images_and_text(tiny):
    scorer = load_clip_scorer(tiny.clip_scorer, seed=tiny.seed)
    image = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8"))
    with torch.no_grad():
        image_features = scorer.model.encode_image(scorer.preprocess(image).unsqueeze(0))
        text_features = scorer.model.encode_text(scorer.tokenizer(["a cat", "a dog"]))
    assert image_features.shape == (1, 32) and text_features.shape == (2, 32)
    assert not torch.allclose(text_features[0], text_features[1])


def _to_toml(data: dict, prefix: str = "") -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines = [f"[{prefix}]"] if prefix and scalars else []
    lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables.items():
        text += _to_toml(value, f"{prefix}.{key}" if prefix else key)
    return text


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def test_noise_schedule_comes_from_the_preset_and_only_epsilon_is_supported(tmp_path):
    from diffusers import EulerDiscreteScheduler

    from restoration.models.base import load_noise_schedule

    tiny = load_preset("tiny")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(load_noise_schedule(tiny), torch.cumprod(1 - betas, 0), atol=1e-6)  # SDXL's schedule, inline

    # A real base's layout: the scheduler config saved by diffusers, read from source + subfolder.
    EulerDiscreteScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02).save_pretrained(tmp_path / "base" / "scheduler")
    data = tiny.model_dump(exclude_none=True)
    data["scheduler"] = {"source": str(tmp_path / "base"), "subfolder": "scheduler"}
    linear = load_noise_schedule(Preset.model_validate(data))
    assert torch.allclose(linear, torch.cumprod(1 - torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64), 0), atol=1e-6)

    data["name"] = "vpred-base"
    data["scheduler"] = {"config": {**tiny.scheduler.config, "prediction_type": "v_prediction"}}
    with pytest.raises(PresetError, match="preset 'vpred-base': scheduler prediction_type 'v_prediction' is not supported"):
        load_noise_schedule(Preset.model_validate(data))
