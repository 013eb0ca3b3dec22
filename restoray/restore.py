"""`restoray restore`: check the inputs, resolve the weights' URI, restore with a progress bar, write the image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from restoration.errors import InputError
from restoration.settings import RestoreConfig, SamplerConfig
from restoray.config import RunConfig
from runtime.resolve import resolve


def read_image(path: str):
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


def restore_settings(config: RunConfig, args: argparse.Namespace) -> tuple[SamplerConfig, RestoreConfig]:
    """The run's [sampler] and [restore] sections (over a --sampler preset) with the command line's shortcuts
    (--steps, --cfg, --tau-r, --seed, --restoration-prompt, --experts) on top; validated like the config itself."""
    from restoration.sampling.presets import with_sampler_preset

    # The preset's fields, with what the run's [sampler] section or --set said explicitly on top.
    sampler = with_sampler_preset(config.sampler, getattr(args, "sampler", None))
    for key, value in (("steps", args.steps), ("cfg", args.cfg)):
        if value is not None:
            sampler[key] = value
    if args.tau_r is not None:
        sampler["tau_r"] = args.tau_r if args.tau_r > 0 else None
    restore = config.restore.model_dump()
    shortcuts = (("seed", args.seed), ("restoration_prompt", args.restoration_prompt))
    shortcuts += (("upscale", getattr(args, "upscale", None)), ("min_size", getattr(args, "min_size", None)))
    shortcuts += (("retrieval_k", getattr(args, "retrieval_k", None)), ("min_similarity", getattr(args, "min_similarity", None)))
    for key, value in shortcuts:
        if value is not None:
            restore[key] = value
    if args.experts is not None:
        restore["expert_weights"] = parse_expert_weights(args.experts)
    try:
        return SamplerConfig.model_validate(sampler), RestoreConfig.model_validate(restore)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise InputError(f"restore settings: {problems} (from --steps/--cfg/--tau-r/--seed or [sampler]/[restore])") from None


def run_restore(config: RunConfig, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from restoration.precision import inference_device
    from restoration.restorer import Restorer

    if Path(args.output).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise InputError(f"--output {args.output!r}: use a .png, .jpg or .webp file name")
    sampler, options = restore_settings(config, args)
    image = read_image(args.input)
    auto = args.references == "auto"
    if auto and args.reference:
        raise InputError("--references auto retrieves the references: give it or --reference PATH, not both")
    if auto != (args.index is not None):
        raise InputError("--references auto needs --index URI (and --index is only used with --references auto)")
    references = "auto" if auto else tuple(read_image(path) for path in args.reference)
    source = resolve(args.weights, config.storage, config.mlflow) if args.weights else (args.preset or config.preset)
    restorer = Restorer.from_pretrained(source, device=inference_device(), dtype=options.dtype, offload=options.offload)
    index = None
    if auto:
        from restoray.index import load_index

        index = load_index(args.index, config)
    # A bar on a terminal; a CI log gets the one summary line below instead of carriage-return noise.
    with tqdm(total=sampler.steps, desc="restoring", unit="step", disable=not sys.stderr.isatty()) as progress:
        restoration = restorer.restore(
            image,
            prompt=args.prompt,
            references=references,
            sampler=sampler,
            options=options,
            index=index,
            on_step=lambda info: progress.update(1),
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    restoration.image.save(args.output)
    width, height = restoration.image.size
    if restoration.retrieval is not None:
        retrieval = restoration.retrieval
        found = ", ".join(f"{source} ({similarity:.4f})" for source, similarity in retrieval.candidates) or "nothing"
        if retrieval.fell_back:
            print(f"references: none at or above {retrieval.min_similarity:g} (found {found}): restored without a reference")
        else:
            print(f"references: {', '.join(f'{ref.source} ({ref.similarity:.4f})' for ref in retrieval.used)}")
    print(
        f"restored {args.input} -> {args.output} ({width}x{height}, {sampler.steps} steps, seed {restoration.seed}, "
        f"{restoration.seconds['total']:.1f}s); caption{' (VLM)' if restoration.captioned else ''}: {restoration.caption!r}"
    )
    return 0
