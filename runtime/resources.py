"""The one resource check: on a fixed-size Ray instance, work that holds CPUs for a whole job (actor pools, training
workers) must leave enough for the tasks that run beside it, or the job waits forever instead of failing."""

from __future__ import annotations

from restoration.errors import InputError


def check_cpus_left(held: float, needed_beside: float, what: str, fix: str, single_node_only: bool = False) -> None:
    """Raise `InputError` when `held` CPUs leave fewer than `needed_beside` of the connected cluster's CPUs.
    `single_node_only`: skip multi-node clusters (they may autoscale)."""
    import ray

    if single_node_only and len([node for node in ray.nodes() if node.get("Alive")]) != 1:
        return
    available = ray.cluster_resources().get("CPU", 0.0)
    if available - held < needed_beside:
        raise InputError(
            f"{what} hold {held:g} of this Ray instance's {available:g} CPUs, leaving {available - held:g} for the tasks "
            f"beside them, which need {needed_beside:g}; {fix}"
        )
