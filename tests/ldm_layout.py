"""Names and shapes of sgm/CompVis LDM checkpoints, written from the model definitions (sgm's openaimodel ResBlock,
SpatialTransformer, Downsample/Upsample; the LDM VAE; open_clip's text transformer), independently of any converter:
the tests build synthetic checkpoints from them and check where the converters put each value.
"""

from __future__ import annotations


def resblock_layout(prefix: str, cin: int, cout: int, time: int) -> dict[str, list[int]]:
    shapes = {
        "in_layers.0.weight": [cin],
        "in_layers.0.bias": [cin],
        "in_layers.2.weight": [cout, cin, 3, 3],
        "in_layers.2.bias": [cout],
        "emb_layers.1.weight": [cout, time],
        "emb_layers.1.bias": [cout],
        "out_layers.0.weight": [cout],
        "out_layers.0.bias": [cout],
        "out_layers.3.weight": [cout, cout, 3, 3],
        "out_layers.3.bias": [cout],
    }
    if cin != cout:
        shapes.update({"skip_connection.weight": [cout, cin, 1, 1], "skip_connection.bias": [cout]})
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def transformer_layout(prefix: str, ch: int, depth: int, context: int) -> dict[str, list[int]]:
    shapes = {
        "norm.weight": [ch],
        "norm.bias": [ch],
        "proj_in.weight": [ch, ch],
        "proj_in.bias": [ch],
        "proj_out.weight": [ch, ch],
        "proj_out.bias": [ch],
    }
    for k in range(depth):
        block = {
            "attn1.to_q.weight": [ch, ch],
            "attn1.to_k.weight": [ch, ch],
            "attn1.to_v.weight": [ch, ch],
            "attn1.to_out.0.weight": [ch, ch],
            "attn1.to_out.0.bias": [ch],
            "attn2.to_q.weight": [ch, ch],
            "attn2.to_k.weight": [ch, context],
            "attn2.to_v.weight": [ch, context],
            "attn2.to_out.0.weight": [ch, ch],
            "attn2.to_out.0.bias": [ch],
            "ff.net.0.proj.weight": [8 * ch, ch],
            "ff.net.0.proj.bias": [8 * ch],
            "ff.net.2.weight": [ch, 4 * ch],
            "ff.net.2.bias": [ch],
        }
        for norm in ("norm1", "norm2", "norm3"):
            block.update({f"{norm}.weight": [ch], f"{norm}.bias": [ch]})
        shapes.update({f"transformer_blocks.{k}.{name}": shape for name, shape in block.items()})
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def vae_resnet_layout(prefix: str, cin: int, cout: int) -> dict[str, list[int]]:
    shapes = {"norm1.weight": [cin], "norm1.bias": [cin], "conv1.weight": [cout, cin, 3, 3], "conv1.bias": [cout]}
    shapes.update({"norm2.weight": [cout], "norm2.bias": [cout], "conv2.weight": [cout, cout, 3, 3], "conv2.bias": [cout]})
    if cin != cout:
        shapes.update({"nin_shortcut.weight": [cout, cin, 1, 1], "nin_shortcut.bias": [cout]})
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def ldm_unet_encoder_layout(size: dict, prefix: str) -> tuple[dict[str, list[int]], list[int]]:
    """An SDXL-structured UNet's embeddings, input blocks and middle block (GLVControl's trunk is this), and the skip
    channels its input blocks leave for the decoder. `size`: channels [c0, c1, c2], depth per level, mid_depth,
    context, adm."""
    c0, c2 = size["channels"][0], size["channels"][-1]
    time = 4 * c0
    shapes: dict[str, list[int]] = {}
    shapes.update({f"{prefix}.time_embed.0.weight": [time, c0], f"{prefix}.time_embed.0.bias": [time]})
    shapes.update({f"{prefix}.time_embed.2.weight": [time, time], f"{prefix}.time_embed.2.bias": [time]})
    shapes.update({f"{prefix}.label_emb.0.0.weight": [time, size["adm"]], f"{prefix}.label_emb.0.0.bias": [time]})
    shapes.update({f"{prefix}.label_emb.0.2.weight": [time, time], f"{prefix}.label_emb.0.2.bias": [time]})
    shapes.update({f"{prefix}.input_blocks.0.0.weight": [c0, 4, 3, 3], f"{prefix}.input_blocks.0.0.bias": [c0]})
    skips, index, previous = [c0], 1, c0
    for level, (ch, depth) in enumerate(zip(size["channels"], size["depth"], strict=True)):
        for _ in range(2):
            shapes.update(resblock_layout(f"{prefix}.input_blocks.{index}.0", previous, ch, time))
            if depth:
                shapes.update(transformer_layout(f"{prefix}.input_blocks.{index}.1", ch, depth, size["context"]))
            index, previous = index + 1, ch
            skips.append(ch)
        if level < 2:
            shapes.update({f"{prefix}.input_blocks.{index}.0.op.weight": [ch, ch, 3, 3], f"{prefix}.input_blocks.{index}.0.op.bias": [ch]})
            index += 1
            skips.append(ch)
    shapes.update(resblock_layout(f"{prefix}.middle_block.0", c2, c2, time))
    shapes.update(transformer_layout(f"{prefix}.middle_block.1", c2, size["mid_depth"], size["context"]))
    shapes.update(resblock_layout(f"{prefix}.middle_block.2", c2, c2, time))
    return shapes, skips


def ldm_unet_layout(size: dict, prefix: str = "model.diffusion_model") -> dict[str, list[int]]:
    """An SDXL-structured UNet: the encoder part above, 9 output blocks, out."""
    c0, c2 = size["channels"][0], size["channels"][-1]
    time = 4 * c0
    shapes, skips = ldm_unet_encoder_layout(size, prefix)
    ch, index = c2, 0
    for level in (2, 1, 0):
        out, depth = size["channels"][level], size["depth"][level]
        for position in range(3):
            shapes.update(resblock_layout(f"{prefix}.output_blocks.{index}.0", ch + skips.pop(), out, time))
            ch = out
            layer = 1
            if depth:
                shapes.update(transformer_layout(f"{prefix}.output_blocks.{index}.1", ch, depth, size["context"]))
                layer = 2
            if level and position == 2:
                shapes.update({f"{prefix}.output_blocks.{index}.{layer}.conv.weight": [ch, ch, 3, 3]})
                shapes.update({f"{prefix}.output_blocks.{index}.{layer}.conv.bias": [ch]})
            index += 1
    shapes.update(
        {f"{prefix}.out.0.weight": [c0], f"{prefix}.out.0.bias": [c0], f"{prefix}.out.2.weight": [4, c0, 3, 3], f"{prefix}.out.2.bias": [4]}
    )
    return shapes


def ldm_vae_encoder_layout(prefix: str, channels: list[int], blocks: int) -> dict[str, list[int]]:
    shapes = {f"{prefix}.conv_in.weight": [channels[0], 3, 3, 3], f"{prefix}.conv_in.bias": [channels[0]]}
    previous = channels[0]
    for level, ch in enumerate(channels):
        for block in range(blocks):
            shapes.update(vae_resnet_layout(f"{prefix}.down.{level}.block.{block}", previous, ch))
            previous = ch
        if level < len(channels) - 1:
            shapes.update(
                {f"{prefix}.down.{level}.downsample.conv.weight": [ch, ch, 3, 3], f"{prefix}.down.{level}.downsample.conv.bias": [ch]}
            )
    shapes.update(vae_middle_layout(prefix, channels[-1]))
    shapes.update({f"{prefix}.norm_out.weight": [channels[-1]], f"{prefix}.norm_out.bias": [channels[-1]]})
    shapes.update({f"{prefix}.conv_out.weight": [8, channels[-1], 3, 3], f"{prefix}.conv_out.bias": [8]})
    return shapes


def vae_middle_layout(prefix: str, top: int) -> dict[str, list[int]]:
    shapes = {**vae_resnet_layout(f"{prefix}.mid.block_1", top, top), **vae_resnet_layout(f"{prefix}.mid.block_2", top, top)}
    shapes.update({f"{prefix}.mid.attn_1.norm.weight": [top], f"{prefix}.mid.attn_1.norm.bias": [top]})
    for name in ("q", "k", "v", "proj_out"):
        shapes.update({f"{prefix}.mid.attn_1.{name}.weight": [top, top, 1, 1], f"{prefix}.mid.attn_1.{name}.bias": [top]})
    return shapes


def ldm_vae_layout(channels: list[int], blocks: int, prefix: str = "first_stage_model") -> dict[str, list[int]]:
    """The whole LDM AutoencoderKL (z 4, double_z): encoder, quant convs, decoder with blocks + 1 ResBlocks a level."""
    shapes = ldm_vae_encoder_layout(f"{prefix}.encoder", channels, blocks)
    shapes.update({f"{prefix}.quant_conv.weight": [8, 8, 1, 1], f"{prefix}.quant_conv.bias": [8]})
    shapes.update({f"{prefix}.post_quant_conv.weight": [4, 4, 1, 1], f"{prefix}.post_quant_conv.bias": [4]})
    decoder, top = f"{prefix}.decoder", channels[-1]
    shapes.update({f"{decoder}.conv_in.weight": [top, 4, 3, 3], f"{decoder}.conv_in.bias": [top]})
    shapes.update(vae_middle_layout(decoder, top))
    block_in = top
    for level in reversed(range(len(channels))):
        block_out = channels[level]
        for block in range(blocks + 1):
            shapes.update(vae_resnet_layout(f"{decoder}.up.{level}.block.{block}", block_in, block_out))
            block_in = block_out
        if level:
            shapes.update(
                {
                    f"{decoder}.up.{level}.upsample.conv.weight": [block_in, block_in, 3, 3],
                    f"{decoder}.up.{level}.upsample.conv.bias": [block_in],
                }
            )
    shapes.update({f"{decoder}.norm_out.weight": [channels[0]], f"{decoder}.norm_out.bias": [channels[0]]})
    shapes.update({f"{decoder}.conv_out.weight": [3, channels[0], 3, 3], f"{decoder}.conv_out.bias": [3]})
    return shapes


def open_clip_text_layout(
    prefix: str, width: int, layers: int, intermediate: int, projection: int, vocab: int = 49408, context: int = 77
) -> dict[str, list[int]]:
    """open_clip's text tower as sgm's FrozenOpenCLIPEmbedder2 stores it (no visual tower)."""
    shapes = {f"{prefix}.token_embedding.weight": [vocab, width], f"{prefix}.positional_embedding": [context, width]}
    for layer in range(layers):
        block = f"{prefix}.transformer.resblocks.{layer}"
        shapes.update(
            {f"{block}.ln_1.weight": [width], f"{block}.ln_1.bias": [width], f"{block}.ln_2.weight": [width], f"{block}.ln_2.bias": [width]}
        )
        shapes.update({f"{block}.attn.in_proj_weight": [3 * width, width], f"{block}.attn.in_proj_bias": [3 * width]})
        shapes.update({f"{block}.attn.out_proj.weight": [width, width], f"{block}.attn.out_proj.bias": [width]})
        shapes.update({f"{block}.mlp.c_fc.weight": [intermediate, width], f"{block}.mlp.c_fc.bias": [intermediate]})
        shapes.update({f"{block}.mlp.c_proj.weight": [width, intermediate], f"{block}.mlp.c_proj.bias": [width]})
    shapes.update(
        {f"{prefix}.ln_final.weight": [width], f"{prefix}.ln_final.bias": [width], f"{prefix}.text_projection": [width, projection]}
    )
    shapes[f"{prefix}.logit_scale"] = []
    return shapes
