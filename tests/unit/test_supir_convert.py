"""SUPIR-v0 checkpoint conversion: names and shapes of the released layout on the meta device, values on a scaled-down
synthetic checkpoint, and a converted directory that still loads after being moved.

The synthetic checkpoint comes from `ldm_supir_layout` below, written from SUPIR's model definition (sgm's ResBlock /
SpatialTransformer / Downsample names, GLVControl's trunk, LightGLVUNet's project_modules lists, the LDM VAE
encoder), not from the converter; at SDXL's sizes it must reproduce tests/data/supir/supir_v0_state_dict.json (the
names and shapes of the released checkpoint) exactly, which is checked first.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import subprocess_env
from tests.ldm_layout import ldm_unet_encoder_layout, ldm_vae_encoder_layout

DATA = Path(__file__).parents[1] / "data" / "supir"
SDXL = {
    "channels": [320, 640, 1280],
    "depth": [0, 2, 10],
    "mid_depth": 10,
    "context": 2048,
    "adm": 2816,
    "vae": [128, 256, 512, 512],
    "vae_blocks": 2,
}
TINY = {"channels": [32, 32, 64], "depth": [0, 2, 2], "mid_depth": 2, "context": 64, "adm": 80, "vae": [8, 16, 32, 32], "vae_blocks": 1}


def ldm_supir_layout(size: dict) -> dict[str, list[int]]:
    """Names and shapes of a SUPIR-v0 checkpoint for UNet channels/depths `size` (SUPIR_v0.yaml's structure)."""
    c0, c1, c2 = size["channels"]
    shapes, _ = ldm_unet_encoder_layout(size, "model.control_model")  # GLVControl: SDXL's encoder + middle, own embeddings
    shapes.update({"model.control_model.input_hint_block.0.weight": [c0, 4, 3, 3], "model.control_model.input_hint_block.0.bias": [c0]})

    # LightGLVUNet.__init__: cond_output_channels, project_channels (scale 2), concat_channels; ZeroCrossAttn inserted
    # at 6, then at 3.
    cond = [c0] * 4 + [c1] * 3 + [c2] * 3
    concat = [c0] * 2 + [c1] * 3 + [c2] * 4 + [0]
    modules: list[tuple] = [("sft", cond[i], cond[i], concat[i]) for i in range(10)]
    for i in (6, 3):
        modules.insert(i, ("attn", cond[i], concat[i]))
    for index, module in enumerate(modules):
        prefix = f"model.diffusion_model.project_modules.{index}"
        if module[0] == "sft":
            _, label, norm, extra = module
            total = norm + extra
            leaf = {"param_free_norm.weight": [total], "param_free_norm.bias": [total], "mlp_shared.0.weight": [128, label, 3, 3]}
            leaf.update({"mlp_shared.0.bias": [128], "zero_mul.weight": [total, 128, 3, 3], "zero_mul.bias": [total]})
            leaf.update({"zero_add.weight": [total, 128, 3, 3], "zero_add.bias": [total], "zero_conv.weight": [norm, label, 1, 1]})
            leaf.update({"zero_conv.bias": [norm]})
        else:
            _, context, query = module
            leaf = {"attn.to_q.weight": [query, query], "attn.to_k.weight": [query, context], "attn.to_v.weight": [query, context]}
            leaf.update({"attn.to_out.0.weight": [query, query], "attn.to_out.0.bias": [query]})
            leaf.update({"norm1.weight": [query], "norm1.bias": [query], "norm2.weight": [context], "norm2.bias": [context]})
        shapes.update({f"{prefix}.{k}": v for k, v in leaf.items()})

    shapes.update(ldm_vae_encoder_layout("first_stage_model.denoise_encoder", size["vae"], size["vae_blocks"]))
    return shapes


def test_the_layout_generator_reproduces_the_released_names_and_shapes():
    released = json.loads((DATA / "supir_v0_state_dict.json").read_text())
    assert released["total_tensors"] == 1034
    assert ldm_supir_layout(SDXL) == released["keys"]


def test_every_released_tensor_lands_with_its_shape_on_the_meta_device():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from restoration.models.adaptor import AdaptedUNet, AdaptorConfig
    from restoration.models.encoder import RobustEncoder
    from restoration.models.presets import load_preset
    from restoration.models.supir_checkpoint import convert_supir_state, expected_state

    configs = Path(__file__).parents[2] / "restoration" / "models" / "base_configs"

    def config(name: str) -> dict:
        return {k: v for k, v in json.loads((configs / name).read_text()).items() if not k.startswith("_")}

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**config("sdxl_unet.json")), AutoencoderKL(**config("sdxl_vae.json"))
        model = AdaptedUNet(unet, AdaptorConfig.model_validate(load_preset("supir-v0").adaptor))
        encoder = RobustEncoder(vae)
    released = json.loads((DATA / "supir_v0_state_dict.json").read_text())["keys"]
    checkpoint = {name: torch.empty(shape, device="meta") for name, shape in released.items()}
    checkpoint["model.control_model.mask_LQ"] = torch.empty(1, 4, 64, 64, device="meta")  # dropped by name
    expected = expected_state(model, encoder)
    converted = convert_supir_state(checkpoint, model, unet.config, vae.config, expected)
    # One to one: every tensor of the checkpoint has a place, every adaptor/connector/encoder tensor is filled.
    assert len(converted) == len(released) == len(expected)
    assert {name: tuple(t.shape) for name, t in converted.items()} == {name: tuple(s) for name, s in expected.items()}
    assert {n for n in converted if n.startswith("model.adaptor.")} >= {
        "model.adaptor.time_embedding.linear_1.weight",
        "model.adaptor.add_embedding.linear_1.weight",
    }

    from restoration.models.supir_checkpoint import CheckpointMismatch

    with pytest.raises(CheckpointMismatch, match="not SUPIR-v0's"):
        convert_supir_state(
            {**checkpoint, "model.diffusion_model.out.0.weight": torch.empty(4, device="meta")}, model, unet.config, vae.config, expected
        )
    short = {k: v for k, v in checkpoint.items() if "project_modules.5." not in k}
    with pytest.raises(CheckpointMismatch, match="missing"):
        convert_supir_state(short, model, unet.config, vae.config, expected)


TINY_SUPIR_ADAPTOR = """
[adaptor]
transformer_depth = "full"
connector = "zero_sft"
connector_hidden = 128
cross_attention_head_dim = 64
norm_affine = true
mid_connector = true
own_embeddings = true
condition = "semantic"
"""


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """A tiny SDXL base (diffusers folder), a tiny SUPIR-v0 layout preset and a synthetic checkpoint of that size."""
    from restoration.models.base import load_sdxl, save_sdxl
    from restoration.models.presets import load_preset, preset_file

    root = tmp_path_factory.mktemp("supir")
    save_sdxl(load_sdxl(load_preset("tiny")), root / "sdxl")
    layout = root / "tiny-supir.toml"
    layout.write_text(preset_file("tiny").read_text().replace('name = "tiny"', 'name = "tiny-supir"') + TINY_SUPIR_ADAPTOR)
    generator = torch.Generator().manual_seed(0)
    checkpoint = {name: torch.randn(shape, generator=generator) for name, shape in ldm_supir_layout(TINY).items()}
    checkpoint["model.control_model.mask_LQ"] = torch.zeros(1, 4, 8, 8)
    torch.save(checkpoint, root / "SUPIR-v0Q.ckpt")
    return root, layout, checkpoint


def test_values_land_where_supir_uses_them_and_the_directory_moves(tiny_release, tmp_path):
    from PIL import Image

    from restoration.restorer import Restorer
    from restoration.settings import SamplerConfig

    root, layout, checkpoint = tiny_release
    output = tmp_path / "converted"
    command = [sys.executable, "-m", "restoray", "convert", "supir", str(root / "SUPIR-v0Q.ckpt"), "--sdxl", str(root / "sdxl")]
    command += ["--output", str(output), "--layout", str(layout)]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    moved = tmp_path / "elsewhere" / "supir-v0q"
    moved.parent.mkdir()
    shutil.move(output, moved)
    assert json.loads((moved / "restorer.json").read_text())["preset"] == "preset.toml"

    restorer = Restorer.from_pretrained(moved)
    state = restorer.trained_state()

    def same(ours: str, theirs: str) -> bool:
        return torch.equal(state[ours], checkpoint[theirs])

    trunk, pm, enc = "model.control_model.", "model.diffusion_model.project_modules.", "first_stage_model.denoise_encoder."
    # Hand-written pairs, read off SUPIR's forward: the trunk, the LQ path, the connectors in LightGLVUNet's order.
    assert same("model.adaptor.time_embedding.linear_1.weight", trunk + "time_embed.0.weight")
    assert same("model.adaptor.add_embedding.linear_2.bias", trunk + "label_emb.0.2.bias")
    assert same("model.adaptor.conv_in.weight", trunk + "input_blocks.0.0.weight")
    assert same("model.adaptor.lq_conv_in.weight", trunk + "input_hint_block.0.weight")
    assert same(
        "model.adaptor.down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k.weight",
        trunk + "input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight",
    )
    assert same("model.adaptor.down_blocks.0.downsamplers.0.conv.weight", trunk + "input_blocks.3.0.op.weight")
    assert same("model.adaptor.mid_block.resnets.1.conv2.weight", trunk + "middle_block.2.out_layers.3.weight")
    assert same("model.mid_connector.gamma.weight", pm + "11.zero_mul.weight")
    assert same("model.connectors.0.0.skip_add.weight", pm + "10.zero_conv.weight")
    assert same("model.connectors.0.2.norm.weight", pm + "8.param_free_norm.weight")
    assert same("model.cross_attentions.0.to_k.weight", pm + "7.attn.to_k.weight")
    assert same("model.cross_attentions.0.norm_c.bias", pm + "7.norm2.bias")
    assert same("model.connectors.1.0.shared.0.weight", pm + "6.mlp_shared.0.weight")
    assert same("model.cross_attentions.1.to_out.weight", pm + "3.attn.to_out.0.weight")
    assert same("model.connectors.2.2.beta.bias", pm + "0.zero_add.bias")
    assert same("encoder.encoder.conv_out.weight", enc + "conv_out.weight")
    assert same("encoder.encoder.down_blocks.1.resnets.0.conv_shortcut.weight", enc + "down.1.block.0.nin_shortcut.weight")
    assert torch.equal(state["encoder.encoder.mid_block.attentions.0.to_q.weight"], checkpoint[enc + "mid.attn_1.q.weight"][:, :, 0, 0])
    # Every released value is somewhere (the random tensors are distinct), and SUPIR's VAE quant_conv is the base's.
    placed = {round(float(t.double().sum()), 6) for t in state.values()}
    assert all(round(float(t.double().sum()), 6) in placed for name, t in checkpoint.items() if "mask_LQ" not in name)
    assert torch.equal(state["encoder.quant_conv.weight"], restorer.networks.vae.quant_conv.weight)

    restored = restorer.restore(Image.new("RGB", (40, 32), (90, 120, 60)), prompt="a field", sampler=SamplerConfig(steps=2))
    assert restored.image.size == (40, 32) and restored.model["weights"] == str(moved)


def test_bad_inputs_are_named(tiny_release, tmp_path):
    root, layout, _ = tiny_release
    base = [sys.executable, "-m", "restoray", "convert", "supir"]

    def run(*args):
        return subprocess.run([*base, *args], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=120)

    missing = run(str(tmp_path / "nope.ckpt"), "--sdxl", str(root / "sdxl"), "--output", str(tmp_path / "out"))
    assert missing.returncode == 2 and "nope.ckpt" in missing.stderr
    not_sdxl = run(str(root / "SUPIR-v0Q.ckpt"), "--sdxl", str(tmp_path), "--output", str(tmp_path / "out"))
    assert not_sdxl.returncode == 2 and "not an SDXL diffusers folder" in not_sdxl.stderr
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"x": object()}))
    unsafe = run(str(tmp_path / "evil.ckpt"), "--sdxl", str(root / "sdxl"), "--output", str(tmp_path / "out"), "--layout", str(layout))
    assert unsafe.returncode == 2 and "weights_only" in unsafe.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_an_original_single_file_sdxl_checkpoint_converts_offline(tiny_release, tmp_path):
    """SUPIR loads SDXL from the single file sd_xl_base_1.0_0.9vae.safetensors; a tiny one in its sgm names here."""
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from restoration.models.presets import load_preset
    from restoration.restorer import Restorer
    from restoration.settings import SamplerConfig
    from tests.ldm_layout import ldm_unet_layout, ldm_vae_layout, open_clip_text_layout

    root, layout, _ = tiny_release
    tiny = load_preset("tiny")
    generator = torch.Generator().manual_seed(1)
    shapes = {**ldm_unet_layout(TINY), **ldm_vae_layout(TINY["vae"], TINY["vae_blocks"])}
    bigg = tiny.text_encoder_2.config
    shapes.update(
        open_clip_text_layout(
            "conditioner.embedders.1.model",
            bigg["hidden_size"],
            bigg["num_hidden_layers"],
            bigg["intermediate_size"],
            bigg["projection_dim"],
        )
    )
    single = {name: torch.randn(shape, generator=generator) * 0.05 for name, shape in shapes.items()}
    # transformers' CLIPTextModel names as sgm stored them (with the "text_model." level transformers 5 dropped).
    clip_l = CLIPTextModel(CLIPTextConfig(**tiny.text_encoder.config)).state_dict()
    clip_l = {name if name.startswith("text_model.") else f"text_model.{name}": t for name, t in clip_l.items()}
    single.update(
        {f"conditioner.embedders.0.transformer.{name}": torch.randn(t.shape, generator=generator) * 0.05 for name, t in clip_l.items()}
    )
    save_file(single, str(tmp_path / "sd_xl_tiny.safetensors"))

    output = tmp_path / "converted"
    command = [
        sys.executable,
        "-m",
        "restoray",
        "convert",
        "supir",
        str(root / "SUPIR-v0Q.ckpt"),
        "--sdxl",
        str(tmp_path / "sd_xl_tiny.safetensors"),
    ]
    result = subprocess.run(
        [*command, "--output", str(output), "--layout", str(layout)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    restorer = Restorer.from_pretrained(output)
    networks = restorer.networks
    unet, vae = "model.diffusion_model.", "first_stage_model."
    # Hand-written pairs: sgm's name -> the diffusers/transformers module that must hold it.
    assert torch.equal(networks.unet.up_blocks[0].resnets[0].conv1.weight, single[unet + "output_blocks.0.0.in_layers.2.weight"])
    assert torch.equal(networks.unet.up_blocks[1].upsamplers[0].conv.weight, single[unet + "output_blocks.5.2.conv.weight"])
    assert torch.equal(networks.unet.conv_out.weight, single[unet + "out.2.weight"])
    assert torch.equal(networks.unet.add_embedding.linear_1.weight, single[unet + "label_emb.0.0.weight"])
    assert torch.equal(networks.vae.decoder.up_blocks[0].resnets[0].conv1.weight, single[vae + "decoder.up.3.block.0.conv1.weight"])
    assert torch.equal(networks.vae.post_quant_conv.weight, single[vae + "post_quant_conv.weight"])
    width = bigg["hidden_size"]
    q_proj = networks.text_encoder_2.text_model.encoder.layers[1].self_attn.q_proj.weight
    assert torch.equal(q_proj, single["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"][:width])
    assert torch.equal(networks.text_encoder_2.text_projection.weight, single["conditioner.embedders.1.model.text_projection"].T)
    token_embedding = networks.text_encoder.get_input_embeddings().weight
    assert torch.equal(token_embedding, single["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"])
    # The tokenizers are CLIP's BPE built offline, the scheduler the layout's; the SUPIR weights sit on this base.
    preset_text = (output / "preset.toml").read_text()
    assert 'vocabulary = "open_clip_bpe"' in preset_text and 'pad_token = "!"' in preset_text
    restored = restorer.restore(Image.new("RGB", (40, 32), (90, 120, 60)), prompt="x", sampler=SamplerConfig(steps=1))
    assert restored.image.size == (40, 32)
