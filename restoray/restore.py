"""`restoray restore`: check the inputs, resolve the weights' URI, restore with a progress bar, write the image."""

from __future__ import annotations

import argparse
from pathlib import Path

from restoration.errors import InputError
from restoray.config import RunConfig
from restoray.uris import resolve


def _read_image(path: str):
    from PIL import Image

    from restoration.images import ImageDecodeError, decode_image

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"cannot read image {path!r}: {err}") from err
    try:
        return Image.fromarray(decode_image(data))
    except ImageDecodeError as err:
        raise InputError(f"{path}: not a usable image ({err})") from err


def parse_expert_weights(text: str) -> str | dict[str, float]:
    """'soft' / 'one_hot', or 'name=weight,...' (oracle weights)."""
    if text in ("soft", "one_hot"):
        return text
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"--experts {text!r}: use soft, one_hot or name=weight[,name=weight...]") from None
    return weights


def run_restore(config: RunConfig, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from restoration.restorer import Restorer

    if args.steps < 1 or args.cfg < 1:
        raise InputError(f"--steps must be >= 1 and --cfg >= 1 (got {args.steps}, {args.cfg})")
    if Path(args.output).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise InputError(f"--output {args.output!r}: use a .png, .jpg or .webp file name")
    expert_weights = parse_expert_weights(args.experts)
    image = _read_image(args.input)
    references = tuple(_read_image(path) for path in args.reference)
    source = resolve(args.weights, config.storage, config.mlflow) if args.weights else (args.preset or config.preset)
    restorer = Restorer.from_pretrained(source)
    with tqdm(total=args.steps, desc="restoring", unit="step") as progress:
        restored = restorer.restore(
            image,
            prompt=args.prompt,
            restoration_prompt=args.restoration_prompt,
            references=references,
            tau_r=args.tau_r if args.tau_r > 0 else None,
            steps=args.steps,
            cfg=args.cfg,
            seed=args.seed,
            expert_weights=expert_weights,
            on_step=lambda info: progress.update(1),
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    restored.save(args.output)
    print(f"restored {args.input} -> {args.output} ({restored.size[0]}x{restored.size[1]})")
    return 0
