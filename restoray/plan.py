"""`restoray plan`: memory and FLOPs of a preset at real size on this machine's CPU (restoration.planning)."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from restoration.errors import InputError


def run_plan(args: argparse.Namespace) -> int:
    from restoration.planning.plan import PlanConfig, format_plan, plan

    values = {
        "preset": args.preset,
        "size": args.size,
        "dtype": args.dtype,
        "gpus": args.gpus,
        "steps": args.steps,
        "train_size": args.train_size,
        "captioner": args.captioner,
    }
    try:
        config = PlanConfig.model_validate({key: value for key, value in values.items() if value is not None})
    except ValidationError as err:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in err.errors())
        raise InputError(f"plan: {problems}") from None
    multiple = 64
    for flag, value in (("--size", config.size), ("--train-size", config.train_size)):
        if value % multiple:
            raise InputError(f"plan: {flag} {value} is not a multiple of {multiple} px (the sizes the model takes)")
    result = plan(config, progress=lambda message: print(f"plan: {message}", file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0
