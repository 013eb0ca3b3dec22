"""The one resource policy of a job, set once when it connects to Ray (`restoray.ray_env.connect`).

- On a fixed-size Ray instance (the embedded one, a cluster without an autoscaler), work that holds CPUs for a whole
  job (actor pools, training workers) must leave enough for the tasks that run beside it, or the job waits forever
  instead of failing: `check_cpus_left` refuses it before it starts (exit 2).
- On an autoscaling cluster nothing is refused for resources that are missing now: a KubeRay cluster scaled to zero
  has 0 CPUs when a job is submitted. Ray Data and Ray Train ask the autoscaler for what they schedule (Ray Data runs
  its own autoscaling coordinator that requests resources every tick; no request of ours competes with it).
  `awaiting_resources` logs what the job waits for and stops it after `ray.resource_wait_s` with `ResourceWaitError`
  (exit 1) naming the resources: Ray Train v2 retries a worker group's start forever, and Ray Data waits as long.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from restoration.errors import InputError, RestorayError

log = logging.getLogger(__name__)
POLL_S = 1.0
LOG_EVERY_S = 30.0
INTERRUPT_EVERY_S = 5.0  # a graceful stop (Ray Train's SIGINT handler) gets this long before the next


@dataclass(frozen=True)
class ResourcePolicy:
    autoscaling: bool = False
    resource_wait_s: float = 600.0


_policy = ResourcePolicy()


def set_policy(policy: ResourcePolicy) -> None:
    """Called once by `connect`: what the connected cluster is (the process holds one Ray connection)."""
    global _policy
    _policy = policy


def policy() -> ResourcePolicy:
    return _policy


class ResourceWaitError(RestorayError):
    """An autoscaling cluster did not provide a job's resources within `ray.resource_wait_s` (exit 1)."""


def has_autoscaler() -> bool:
    """Whether the connected cluster can add nodes, as far as Ray 2.60 tells (Ray has no one answer):
    - the GCS runs autoscaler v2 (KubeRay's `autoscalerOptions.version: v2`, as `restoray infra render` writes it);
    - or a published cluster config has a node type that may grow (Ray Data's own test, `is_autoscaling_enabled`);
    - or the v1 monitor, which every head runs, reports node types of an autoscaling config (`ray start
      --autoscaling-config`, `ray up`): without one it runs a read-only provider whose types are all
      `format_readonly_node_type(node_id)`.
    The embedded instance and a plain `ray start` show none of these (set ray.autoscaling to say otherwise)."""
    import json

    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.data._internal.cluster_autoscaler.util import is_autoscaling_enabled
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2(fetch_from_server=True) or is_autoscaling_enabled():
        return True
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not status:
        return False
    node_types = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    readonly_prefix = format_readonly_node_type("")
    return any(not node_type.startswith(readonly_prefix) for node_type in node_types.values())


def check_cpus_left(held: float, needed_beside: float, what: str, fix: str, gpus: float = 0.0) -> dict[str, float]:
    """Raise `InputError` when `held` CPUs leave fewer than `needed_beside` of a fixed-size cluster's CPUs. An
    autoscaling cluster is not checked: it adds nodes for what the job schedules. Returns the resources the job needs
    at once (for `awaiting_resources`)."""
    import ray

    needs = {"CPU": held + needed_beside, "GPU": gpus}
    if _policy.autoscaling:
        return needs
    available = ray.cluster_resources().get("CPU", 0.0)
    if available - held < needed_beside:
        raise InputError(
            f"{what} hold {held:g} of this Ray instance's {available:g} CPUs, leaving {available - held:g} for the tasks "
            f"beside them, which need {needed_beside:g}; {fix}"
        )
    return needs


def missing(needs: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    """The part of `needs` that `have` lacks (resource name -> amount short)."""
    return {name: amount - have.get(name, 0.0) for name, amount in needs.items() if amount > 0 and have.get(name, 0.0) < amount}


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(resources.items()) if amount > 0)


@contextmanager
def awaiting_resources(needs: dict[str, float], what: str) -> Iterator[None]:
    """Run the body (a Ray Data or Ray Train job that schedules `needs`); on an autoscaling cluster, watch until the
    cluster's resources reach `needs`, logging what it waits for, and stop the body with `ResourceWaitError` once
    `ray.resource_wait_s` has passed without them. A no-op on a fixed-size cluster (`check_cpus_left` ran)."""
    if not _policy.autoscaling or not any(amount > 0 for amount in needs.values()):
        yield
        return
    import ray

    done, expired = threading.Event(), threading.Event()
    short: dict[str, float] = {}

    def watch() -> None:
        started = time.monotonic()
        next_log = started
        while not done.wait(POLL_S):
            short.clear()
            short.update(missing(needs, ray.cluster_resources()))
            waited = time.monotonic() - started
            if not short:
                if waited > POLL_S:
                    log.warning("the cluster has the resources of %s after %.0f s", what, waited)
                return
            if waited >= _policy.resource_wait_s:
                expired.set()
                # The job's main thread waits inside Ray or on a lock: a real SIGINT (not _thread.interrupt_main, which
                # only sets a flag the thread reads when it next runs Python) wakes a blocked wait with EINTR. Again
                # every INTERRUPT_EVERY_S until the body has ended: an interrupt raised while the main thread runs a
                # finaliser (`__del__`, a weakref callback: Ray runs many) is printed and dropped by Python.
                # The SIGINT alone is not enough where a library replaced its handler (seen in the test suite): the
                # KeyboardInterrupt is also set on the main thread directly, raised at its next bytecode.
                # One at a time, never both at once: a SIGINT and an async exception landing together raise twice,
                # the second in the context manager's exit, which then leaves this watcher running (the suite saw it
                # interrupt pytest itself later).
                main = threading.main_thread().ident
                attempt = 0
                while True:
                    if attempt % 2 == 0:
                        signal.pthread_kill(main, signal.SIGINT)
                    else:
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(main), ctypes.py_object(KeyboardInterrupt))
                    attempt += 1
                    if done.wait(INTERRUPT_EVERY_S):
                        return
            if time.monotonic() >= next_log:
                log.warning(
                    "waiting for the autoscaler: %s need %s; the cluster lacks %s (%.0f of %g s)",
                    what, _describe(needs), _describe(short), waited, _policy.resource_wait_s,
                )  # fmt: skip
                next_log = time.monotonic() + LOG_EVERY_S

    # The SIGINT must reach Python's handler, which aborts a blocking wait with KeyboardInterrupt. A native library can
    # leave its own sigaction behind, which Python's signal module does not see (the suite's restore-batch wait ran
    # to pytest's timeout that way): Python's handler is installed again for the body, the previous one restored after.
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if on_main else None
    if on_main:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = threading.Thread(target=watch, name="restoray-resource-wait", daemon=True)
    watcher.start()

    def stopped() -> ResourceWaitError:
        return ResourceWaitError(
            f"{what} waited {_policy.resource_wait_s:g} s (ray.resource_wait_s) for {_describe(needs)}, and the "
            f"autoscaling cluster still lacks {_describe(short)}: check the worker groups' sizes and max replicas "
            "(a node type with these resources), or raise ray.resource_wait_s"
        )

    def stop_watching() -> None:
        # No further interrupt, and none left pending on this thread to fire after the body (the watcher may have
        # sent one just as the body ended): SIGINT is ignored until the watcher has stopped (a tripped one is then
        # dropped by Python: its handler is SIG_IGN when it checks), the async exception cleared.
        if on_main:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        done.set()
        watcher.join(timeout=5)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)

    try:
        yield
    except BaseException:
        stop_watching()
        # The interrupt surfaces as KeyboardInterrupt, or as what the library makes of it: Ray Train's SIGINT handler
        # aborts the run gracefully, and fit() then fails or exits on its own terms.
        if not expired.is_set():
            raise
        raise stopped() from None
    else:
        stop_watching()
        if expired.is_set():
            raise stopped()
    finally:
        done.set()
        if on_main:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        watcher.join(timeout=5)


def on_the_drivers_node() -> dict:
    """Actor options that keep a job's bookkeeping actor (stage timers, decode counters) on the driver's node.

    Ray places a small actor on any node; on a worker node it dies with that node, and every task that reports to it
    then fails, although the job itself (its driver, Train's controller) lives on. The driver's node is the one node
    the job cannot outlive anyway. Hard affinity: under soft affinity Ray 2.60 still placed half of such 0-CPU actors
    on another node (measured on a two-node cluster)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)}
