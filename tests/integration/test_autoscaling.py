"""`restoray submit` against an autoscaling cluster that starts with no worker: Ray's fake multi-node provider on
127.0.0.1, a 0-CPU head and one worker type (min 0, max 2), started by `ray start --head --autoscaling-config` in its
own session (never `ray.cluster_utils.AutoscalingCluster`: its start and shutdown run `ray stop --force`, which ends
every Ray process on the machine).

A node-local --output is refused before any node starts; a data build from one moto bucket to another and a
restore-batch of a registered model (named by its alias) both wait for the worker nodes the autoscaler adds, run
their actors there, and the actors get URIs: each fake node has its own cache directory (`$RAY_CLOUD_INSTANCE_ID`,
which the provider sets per node, in storage.cache_dir), so the model is found in the worker nodes' caches and not in
the driver's (the nodes share this machine's /tmp: a driver-local path would work here and hide the bug).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from restoray.config import DEFAULT_CONFIG
from tests.conftest import FAKE_AWS, REPO_ROOT, RayHead, free_port, moto_client

WORKER_CPUS = 2
# Autoscaler v1 with the fake provider, modelled on BASE_READONLY_CONFIG (ray/autoscaler/_private/monitor.py): the
# monitor reads the file as it is, so every key is spelled out.
AUTOSCALING = {
    "cluster_name": "restoray-fake",
    "max_workers": 2,
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 2,  # both jobs reuse the nodes the first one brought
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},  # the provider's head name
        "cpu_worker": {"resources": {"CPU": WORKER_CPUS}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    "auth": {},
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


def fake_worker_nodes(gcs_address: str, env: dict) -> dict[str, list[int]]:
    """{node id: its process ids}: the provider runs each worker node inside the autoscaler's monitor process (no
    state file), so its raylet and the raylet's descendants are children of the monitor, whose pid the autoscaler
    publishes in the GCS."""
    probe = (
        "import json, sys; from ray._raylet import GcsClient; "
        "print(json.loads(GcsClient(address=sys.argv[1]).internal_kv_get(b'__autoscaling_status', None))['monitor_pid'])"
    )
    monitor = subprocess.run([sys.executable, "-c", probe, gcs_address], capture_output=True, text=True, env=env, timeout=60)
    assert monitor.returncode == 0, monitor.stderr[-2000:]
    nodes = {}
    for child in psutil.Process(int(monitor.stdout.split()[-1])).children():
        command = child.cmdline()
        if command and command[0].endswith("/raylet"):
            node_id = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--node_id="))
            nodes[node_id] = [child.pid, *(process.pid for process in child.children(recursive=True))]
    return nodes


@pytest.fixture(scope="module")
def autoscaling_cluster():
    """The head (tests.conftest.RayHead) with 0 CPUs and the autoscaling config; the worker nodes the provider
    starts inherit its environment (moto's fake credentials for the actors' S3 reads) and stay in its session."""
    config_dir = Path(tempfile.mkdtemp(prefix="rasc", dir="/tmp"))
    gcs_port = free_port()
    config_path = config_dir / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(dict(AUTOSCALING, provider={**AUTOSCALING["provider"], "gcs_address": f"127.0.0.1:{gcs_port}"})))
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **FAKE_AWS}
    head = RayHead("ras", ("--num-cpus=0", f"--autoscaling-config={config_path}"), env, gcs_port=gcs_port)
    yield {"address": head.address, "gcs": head.gcs, "env": head.env, "dir": config_dir, "head": head}
    # The worker nodes by their process ids first (their raylets outlive a lost GCS for a while), then the session.
    for pids in fake_worker_nodes(head.gcs, head.env).values():
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
    head.stop()
    shutil.rmtree(config_dir, ignore_errors=True)


def _submit(cluster, *args) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "restoray", "submit", "--address", cluster["address"], "--", *args],
        capture_output=True, text=True, env=cluster["env"], cwd=REPO_ROOT, timeout=420,
    )  # fmt: skip
    return result, time.monotonic() - started


def _state(cluster, call: str) -> list:
    """A Ray State API listing (ray.util.state) of the cluster, from a process holding the token."""
    code = (
        f"import json; from ray.util.state import {call.split('(')[0]}; print(json.dumps([item.__dict__ for item in {call}], default=str))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cluster["env"], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


class NodeWatch:
    """When the autoscaler's first worker node appears (polled in a thread while a job runs)."""

    def __init__(self, cluster):
        self.cluster, self.first_seen, self.done = cluster, None, threading.Event()
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.done.wait(1.0):
            if fake_worker_nodes(self.cluster["gcs"], self.cluster["env"]):
                self.first_seen = time.monotonic() - self.started
                return

    def stop(self):
        self.done.set()
        self.thread.join(timeout=30)


def _registered_model(tmp_path, tracking: str) -> str:
    """The tiny preset's weights registered on the MLflow server (artifacts in its S3 bucket), alias 'champion'."""
    import mlflow

    from restoration.restorer import Restorer

    weights = Restorer.from_pretrained("tiny").save_pretrained(tmp_path / "weights")
    client = mlflow.MlflowClient(tracking)
    experiment = client.create_experiment(f"autoscaling-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(weights), artifact_path="weights")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("restoray-autoscaling")
    version = client.create_model_version("restoray-autoscaling", f"{run.info.artifact_uri}/weights", run_id=run.info.run_id)
    client.set_registered_model_alias("restoray-autoscaling", "champion", version.version)
    return version.version


@pytest.mark.slow
def test_jobs_wait_for_the_autoscaler_and_hand_their_actors_uris(autoscaling_cluster, moto_endpoint, mlflow_server, tmp_path):
    from tests.integration.corpus import photos, png_bytes

    cluster = autoscaling_cluster
    s3 = moto_client(moto_endpoint)
    for bucket in ("as-corpus", "as-datasets", "as-restored"):
        s3.create_bucket(Bucket=bucket)
    for index, image in enumerate(photos(3, size=128)):
        s3.put_object(Bucket="as-corpus", Key=f"photos/{index}.png", Body=png_bytes(image))
        s3.put_object(Bucket="as-corpus", Key=f"photos/{index}.txt", Body=f"caption {index}".encode())
    caches = cluster["dir"] / "cache"
    common = ["--config", str(DEFAULT_CONFIG), "--set", f"storage.s3_endpoint_url={moto_endpoint}", "--set",
              f"storage.cache_dir={caches}/node-$RAY_CLOUD_INSTANCE_ID", "--set", f"mlflow.tracking_uri={mlflow_server}"]  # fmt: skip
    build = ["--set", "data.quality.min_short_side=128", "--set", "data.crop.size=128", "--set", "data.embed.enabled=false",
             "--set", "data.caption.mode=keep-source", "--set", "data.negatives.count=0"]  # fmt: skip

    # Node-local output: refused by the job's driver before anything is scheduled, so no node starts.
    local, _ = _submit(cluster, "data", "build", "--input", "s3://as-corpus/photos", "--output", str(tmp_path / "local"), *common, *build)
    assert local.returncode == 1 and "connected to a Ray cluster" in local.stdout + local.stderr, local.stderr[-3000:]
    assert f"--output={str(tmp_path / 'local')!r}" in local.stdout + local.stderr
    assert fake_worker_nodes(cluster["gcs"], cluster["env"]) == {} and not (tmp_path / "local").exists()

    # A data build from S3 to S3 on a cluster with 0 CPUs: it waits for the autoscaler instead of refusing.
    watch = NodeWatch(cluster)
    built, build_seconds = _submit(cluster, "data", "build", "--input", "s3://as-corpus/photos", "--output", "s3://as-datasets/ds",
                                   *common, *build)  # fmt: skip
    watch.stop()
    output = built.stdout + built.stderr
    assert built.returncode == 0, output[-4000:]
    assert "(autoscaling)" in output and "samples written" in output  # ray.autoscaling=auto found the autoscaler
    assert watch.first_seen is not None
    print(f"\ndata build: submitted at 0 s, first worker node at {watch.first_seen:.0f} s, finished at {build_seconds:.0f} s")

    # restore-batch of a registered model named by its alias: pinned on the driver, resolved on each worker node.
    version = _registered_model(tmp_path, mlflow_server)
    restore, restore_seconds = _submit(cluster, "restore-batch", "--input", "s3://as-corpus/photos", "--output", "s3://as-restored/run",
                                       "--weights", "models:/restoray-autoscaling@champion", "--steps", "1", "--prompt", "a photo",
                                       "--set", "restore_batch.actors=1", "--set", "restore_batch.num_cpus=1", *common)  # fmt: skip
    output = restore.stdout + restore.stderr
    assert restore.returncode == 0, output[-4000:]
    print(f"restore-batch: finished {restore_seconds:.0f} s after its submission")

    nodes = _state(cluster, f"list_nodes(address={cluster['address']!r})")
    head = next(node["node_id"] for node in nodes if node["is_head_node"])
    workers = {node["node_id"] for node in nodes if not node["is_head_node"]}
    assert workers, nodes
    actors = _state(cluster, f"list_actors(address={cluster['address']!r}, limit=1000)")
    pools = [actor for actor in actors if "RestoreStage" in actor["class_name"]]
    assert pools and {actor["node_id"] for actor in pools} <= workers and head not in {actor["node_id"] for actor in pools}, pools

    # The actors got a URI: the model is in the worker nodes' own caches, never in the driver's (the head has no
    # RAY_CLOUD_INSTANCE_ID, so its cache_dir keeps the variable's name).
    models = sorted(caches.glob(f"node-*/models/restoray-autoscaling/{version}"))
    assert models and all("$" not in str(path) for path in models), sorted(caches.glob("*"))
    assert not (caches / "node-$RAY_CLOUD_INSTANCE_ID" / "models").exists()
    import pyarrow.parquet as pq
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint}, key="testing", secret="testing")
    results = pq.read_table("as-restored/run/results", filesystem=fs).to_pylist()
    assert len(results) == 3 and {row["model"] for row in results} == {f"models:/restoray-autoscaling/{version}"}
