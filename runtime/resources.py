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


def on_the_drivers_node() -> dict:
    """Actor options that keep a job's bookkeeping actor (stage timers, decode counters) on the driver's node.

    Ray places a small actor on any node; on a worker node it dies with that node, and every task that reports to it
    then fails, although the job itself (its driver, Train's controller) lives on. The driver's node is the one node
    the job cannot outlive anyway. Hard affinity: under soft affinity Ray 2.60 still placed half of such 0-CPU actors
    on another node (measured on a two-node cluster)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)}
