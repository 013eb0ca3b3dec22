"""Connecting to Ray: a cluster when one is named (`ray.address` or RAY_ADDRESS), else a new embedded local instance
in this process; and the job's resource policy (`runtime.resources`): whether the cluster autoscales."""

from __future__ import annotations

import logging
import os
import sys

from restoray.config import RayConfig
from runtime.resources import ResourcePolicy, has_autoscaler, set_policy

log = logging.getLogger(__name__)
ALREADY_CONNECTED = "already connected"


def loopback_only() -> None:
    """Keep a single-machine Ray on 127.0.0.1.

    Ray 2.60 on Linux binds even a local instance to the machine's network address, and
    `--node-ip-address=127.0.0.1` does not change that; this variable does (DESIGN.md, Ray notes). It must be set
    before Ray starts its processes.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def cluster_address(config: RayConfig) -> str | None:
    return config.address or os.environ.get("RAY_ADDRESS") or None


def on_cluster(config: RayConfig) -> bool:
    """Whether the job runs on a Ray cluster (its nodes, now or once it scales, do not see this machine's files)
    rather than the embedded instance in this process: the shared-storage check asks this before connecting."""
    return cluster_address(config) is not None


def quiet_ray(verbose: bool) -> None:
    """A log a person (or a CI log) can read: Ray's and Ray Data's own INFO chatter only with -v, and progress bars
    only on a terminal (in a log they are thousands of carriage returns)."""
    from ray.data import DataContext

    level = logging.INFO if verbose else logging.WARNING
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    context = DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    context.print_on_execution_start = verbose


NO_STATE_API_WARNING = "Failed to query Ray Train Controller actor state"


class _NoStateApiFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return NO_STATE_API_WARNING not in record.getMessage()


def quiet_embedded_worker() -> None:
    """Worker setup hook of the embedded instance. It runs without a dashboard, so Ray Train's placement-group
    cleaner cannot reach the State API and warns about it every second of a training run; the warning says nothing
    there (the instance ends with the process), so it is dropped. Everything else the workers log stays."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").addFilter(_NoStateApiFilter())


def connect(config: RayConfig) -> str:
    """Initialise Ray once per process; returns a description of where it runs."""
    address = cluster_address(config)
    if not address:
        loopback_only()  # before Ray is imported: it reads the variable at import time
    import ray

    verbose = logging.getLogger("restoray").isEnabledFor(logging.DEBUG)
    if ray.is_initialized():
        return ALREADY_CONNECTED
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:
        # Serve's controller, proxies and replicas log to their files under the session's logs/serve, not to this
        # console (-v brings them back). Read by the processes the embedded instance starts, so set before it.
        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    if address:
        # Never num_cpus here: a cluster's nodes declare their own resources, and Ray refuses them on connect.
        ray.init(address=address, namespace=config.namespace, log_to_driver=True, logging_level=level)
        autoscaling = has_autoscaler() if config.autoscaling == "auto" else config.autoscaling
        where = f"cluster at {address}" + (" (autoscaling)" if autoscaling else "")
    else:
        # Ray ends idle workers above RAY_num_workers_soft_limit (default: the CPU count) after a second, so each
        # pass of a job (listing, dedup, counts, a model stage's pool) started Python and imported torch again in
        # new workers: a 3-photo build took 11 s, 3.7 s with them kept. The raylet reads the limit when it starts.
        os.environ.setdefault("RAY_num_workers_soft_limit", str(max(8, 2 * (config.num_cpus or os.cpu_count() or 1))))
        # address="local": a new instance even where another cluster's address file is in Ray's temp dir
        # (ray.init() without an address connects to that cluster, which `ray start` or a crashed run left behind).
        ray.init(
            address="local",
            num_cpus=config.num_cpus,
            namespace=config.namespace,
            include_dashboard=False,
            log_to_driver=True,
            logging_level=level,
            runtime_env={"worker_process_setup_hook": "restoray.ray_env.quiet_embedded_worker"},
        )
        where = f"embedded local instance ({int(ray.cluster_resources().get('CPU', 0))} CPUs, node {ray.util.get_node_ip_address()})"
        autoscaling = config.autoscaling is True  # forced on: lets a test exercise the waiting on one machine
    set_policy(ResourcePolicy(autoscaling=autoscaling, resource_wait_s=config.resource_wait_s))
    quiet_ray(verbose)
    log.debug("Ray: %s", where)
    return where
