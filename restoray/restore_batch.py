"""`restoray restore-batch`: check the settings, resolve the weights and index, run the Ray Data job, print its summary."""

from __future__ import annotations

import argparse

from restoration.errors import InputError
from restoray.config import RunConfig
from restoray.ray_env import cluster_address, connect, loopback_only
from restoray.restore import restore_settings
from runtime.resolve import resolve


def run_restore_batch(config: RunConfig, args: argparse.Namespace) -> int:
    if not cluster_address(config.ray):
        loopback_only()
    from pipelines.restore_batch import restore_batch

    sampler, options = restore_settings(config, args)
    if (args.references == "auto") != (args.index is not None):
        raise InputError("--references auto needs --index URI (and --index is only used with --references auto)")
    weights = resolve(args.weights, config.storage, config.mlflow) if args.weights else (args.preset or config.preset)
    index = resolve(args.index, config.storage, config.mlflow) if args.index else None
    print(f"Ray: {connect(config.ray)}")
    summary = restore_batch(
        args.input,
        args.output,
        config.restore_batch,
        config.data,
        weights,
        sampler,
        options,
        config.storage,
        index=index,
        prompt=args.prompt,
        expert_weights=options.expert_weights if args.experts is not None else None,
    )
    print(summary.table())
    return 0
