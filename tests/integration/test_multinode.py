"""Two Ray nodes on this machine (`ray.cluster_utils.Cluster`: a head and a worker node on 127.0.0.1).

A data build and a two-worker DeepSpeed ZeRO-3 training run (placement SPREAD) whose tasks and workers land on both
nodes, with outputs on S3 (moto) and MLflow a tracking server storing its artifacts in S3; node-local paths refused;
the worker node crashed during training (every process SIGKILLed: no goodbye, the head's health check finds it dead)
and the run resumed from its last checkpoint with both workers on the head
(ZeRO checkpoints are per rank: the world size stays 2), each step logged once, the model registered through the
server; then a second `restoray train` with more steps resumes the run at its saved step in the same MLflow run.
The one end-to-end training run of the suite with two workers. Beside the cluster (its address file in Ray's default
temp dir), the embedded default still starts its own instance.
"""

import json
import re
import subprocess
import sys
import time

import pytest

from restoray.config import DEFAULT_CONFIG
from tests.conftest import FAKE_AWS, MLFLOW_ARTIFACT_BUCKET, moto_client, s3_keys, subprocess_env
from tests.integration.test_training import _assert_complete_export, sets

CONFIG = str(DEFAULT_CONFIG)
EXPERIMENT = "restoray-two-node"
STEPS = 6


@pytest.fixture(scope="module")
def cluster(moto_endpoint):
    """A head with the CPUs for both training workers and their data tasks (where they all go once the worker node
    is lost) and a worker node; a dashboard for the State API, which tells on which node each task ran."""
    from ray.cluster_utils import Cluster

    from tests.conftest import free_port

    mib = 2**20
    dashboard_port = free_port()
    while dashboard_port == 52365:  # the head's dashboard agent takes Ray's default agent port
        dashboard_port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAKE_AWS.items():  # every node's processes inherit the environment they start with
            patch.setenv(key, value)
        two_nodes = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 4, "object_store_memory": 300 * mib, "include_dashboard": True, "dashboard_port": dashboard_port,
                # A crashed node is found by the GCS health check alone: 1 s x 3 misses instead of Ray's 3 s x 5.
                "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
            },
        )  # fmt: skip
        worker = two_nodes.add_node(num_cpus=2, object_store_memory=200 * mib)
        two_nodes.wait_for_nodes()
        yield two_nodes, worker
        two_nodes.shutdown()


def restoray(*args: str, cwd, address: str, endpoint: str, background: bool = False, log=None):
    """`restoray ...` as a driver of the two-node cluster, its S3 on moto."""
    command = [sys.executable, "-m", "restoray", *args, *sets(ray__address=address, storage__s3_endpoint_url=endpoint)]
    environment = subprocess_env(**FAKE_AWS)
    environment.pop("RAY_ADDRESS", None)
    if background:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=environment)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=environment, timeout=600)


def _upload_samples(root, endpoint: str) -> str:

    from restoray.samples import materialise

    materialise(str(root / "samples"))
    s3 = moto_client(endpoint)
    s3.create_bucket(Bucket="corpus")
    # Three copies (the build rejects the byte-identical ones as duplicates): enough read tasks that SPREAD, Ray
    # Data's default task placement, has work for both nodes.
    for copy in "abc":
        for path in sorted((root / "samples").iterdir()):
            s3.upload_file(str(path), "corpus", f"photos/{copy}_{path.name}")
    return "s3://corpus/photos"


def _placements(log_text: str) -> list[tuple[str, dict[int, str]]]:
    """The training's `[train] ...; ranks on nodes 0=ID, 1=ID` lines: (how the attempt started, rank -> node id)."""
    pattern = r"\[train\] (started at step 0|resumed from the checkpoint of step \d+); ranks on nodes (\S+, \S+)"
    return [
        (start, {int(r): node for r, node in (item.split("=") for item in ranks.split(", "))})
        for start, ranks in re.findall(pattern, log_text)
    ]


def _loss_steps(client, experiment: str) -> tuple[str, list[int]]:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    if not runs:
        return "", []
    assert len(runs) == 1, "the run (and its restart) log into one MLflow run"
    run_id = runs[0].info.run_id
    return run_id, sorted(metric.step for metric in client.get_metric_history(run_id, "loss"))


def test_the_embedded_default_starts_its_own_instance_beside_a_cluster(cluster, tmp_path):
    """`ray.init()` without an address connects to the cluster named in Ray's temp dir (as `ray start` and this
    fixture leave it); without RAY_ADDRESS / ray.address, restoray starts its own instance all the same."""
    from ray._common.utils import get_ray_address_file

    two_nodes, _ = cluster
    with open(get_ray_address_file(None)) as address_file:
        assert address_file.read().strip() == two_nodes.address  # what a bare ray.init() would join
    probe = (
        "import ray; from restoray.config import RayConfig; from restoray.ray_env import connect; "
        "print(connect(RayConfig(num_cpus=1))); print('GCS', ray.get_runtime_context().gcs_address, len(ray.nodes()))"
    )
    environment = subprocess_env()
    environment.pop("RAY_ADDRESS", None)
    embedded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=180)
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    assert "embedded local instance (1 CPUs" in embedded.stdout, embedded.stdout
    gcs, nodes = embedded.stdout.split("GCS ", 1)[1].split()
    assert gcs != two_nodes.address and nodes == "1"


@pytest.mark.slow
def test_two_nodes_build_train_lose_a_node_and_resume(cluster, mlflow_server, moto_endpoint, tmp_path):
    import mlflow
    import s3fs
    from ray.util.state import list_tasks

    two_nodes, worker = cluster
    head_id, worker_id = two_nodes.head_node.node_id, worker.node_id
    address, endpoint = two_nodes.address, moto_endpoint
    corpus = _upload_samples(tmp_path, endpoint)
    s3 = moto_client(endpoint)
    for bucket in ("datasets", "train"):
        s3.create_bucket(Bucket=bucket)

    # Node-local output on a cluster of two nodes: refused before anything runs, naming the path.
    local = restoray("data", "build", "--input", corpus, "--output", str(tmp_path / "local"), "--config", CONFIG, cwd=tmp_path,
                     address=address, endpoint=endpoint)  # fmt: skip
    assert local.returncode == 2, local.stderr[-2000:]
    assert "connected to a Ray cluster" in local.stderr and f"--output={str(tmp_path / 'local')!r}" in local.stderr
    assert not (tmp_path / "local").exists()

    build = restoray("data", "build", "--input", corpus, "--output", "s3://datasets/two-node", "--config", CONFIG,
                     "--set", "data.negatives.count=0", cwd=tmp_path, address=address, endpoint=endpoint)  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    assert fs.glob("datasets/two-node/shards/*.parquet")
    dashboard = f"http://{two_nodes.webui_url}"
    # The build's own work: its fused map tasks and its model stages' actor pools (not Ray Data's bookkeeping actors).
    work = [
        task
        for task in list_tasks(address=dashboard, filters=[("state", "=", "FINISHED")], limit=10_000)
        if task.type == "NORMAL_TASK" or task.name.startswith("MapWorker(")
    ]
    placed = sorted((task.name[:48], task.node_id[:8] if task.node_id else None) for task in work)
    assert {task.node_id for task in work} - {None} == {head_id, worker_id}, (head_id[:8], worker_id[:8], placed)

    common = sets(
        train__data="s3://datasets/two-node", train__storage_path="s3://train/runs", train__zero_stage=3, train__num_workers=2,
        train__cpus_per_worker=1, train__placement_strategy="SPREAD", train__checkpoint_every=2, train__max_failures=1,
        mlflow__tracking_uri=mlflow_server, mlflow__experiment=EXPERIMENT,
    )  # fmt: skip
    client = mlflow.MlflowClient(mlflow_server)
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        training = restoray("train", "--config", CONFIG, *common, *sets(train__steps=STEPS), cwd=tmp_path, address=address,
                            endpoint=endpoint, background=True, log=log)  # fmt: skip
        # Lose the worker node once Ray Train has registered a checkpoint (its manager's snapshot in storage: a
        # checkpoint reported by a rank but not yet collected by the controller dies with the rank) and the run has
        # gone past it.
        snapshot = "train/runs/restoray-adaptor/checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 400
        while not fs.exists(snapshot) or not (steps := _loss_steps(client, EXPERIMENT)[1]) or max(steps) < 3:
            assert training.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.3)
            fs.invalidate_cache()
        assert max(steps) < STEPS, f"training reached step {max(steps)} before the node could be removed"
        # A crash, not a goodbye: SIGKILL to each of the node's processes (never killpg: the nodes share pytest's
        # process group), so no raylet announces its exit and the head's health check must declare the node dead.
        two_nodes.remove_node(worker, allow_graceful=False)
        lost_after = max(_loss_steps(client, EXPERIMENT)[1])
        training.wait(timeout=500)
    output = log_path.read_text()
    assert training.returncode == 0, output[-5000:]
    assert "model: models:/restoray-adaptor/1" in output

    placements = _placements(output)
    assert placements[0][0] == "started at step 0" and set(placements[0][1].values()) == {head_id, worker_id}, placements
    resumed, ranks = placements[-1]
    assert resumed.startswith("resumed from the checkpoint of step "), placements
    saved_step = int(resumed.rsplit(" ", 1)[1])
    assert 2 <= saved_step <= lost_after and saved_step % 2 == 0, output[-3000:]  # the last checkpoint before the loss
    assert set(ranks.values()) == {head_id} and len(ranks) == 2  # both workers on the head, world size 2
    # The steps run after the checkpoint are run again, and the log says which: up to the last one logged before the
    # health check declared the node dead (rank 0 on the head goes on meanwhile, so it may be after `lost_after`).
    retraced = re.search(r"\[train\] retracing steps (\d+)\.\.(\d+)", output)
    if saved_step < lost_after:
        assert retraced is not None, output[-3000:]
        assert int(retraced.group(1)) == saved_step + 1 and lost_after <= int(retraced.group(2)) < STEPS, retraced.group(0)
    print(f"\nworker node {worker_id[:8]} crashed after step {lost_after}; resumed from the checkpoint of step {saved_step}; "
          f"{retraced.group(0) if retraced else 'nothing retraced'}")  # fmt: skip
    print("\n".join(line for line in output.splitlines() if "[train]" in line or "node" in line.lower())[-3000:])
    run_id, steps = _loss_steps(client, EXPERIMENT)
    assert steps == list(range(1, STEPS + 1)), steps  # the steps run again after the restart are logged once each

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["config.train.zero_stage"] == "3" and run.data.params["dataset.manifest_id"] != "None"
    assert run.data.tags["restoray.dataset"] == "s3://datasets/two-node" and run.data.tags["restoray.code_version"]
    assert {"lr", "samples_per_s", "memory_mb"} <= set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run_id, "validation")] == [f"validation/step_{STEPS:06d}.png"]
    # The validation restoration scored with `restoray eval`'s code under its metric names.
    assert [m.step for m in client.get_metric_history(run_id, "psnr")] == [STEPS] and 0 < run.data.metrics["psnr"] < 100
    assert -1 <= run.data.metrics["ssim"] <= 1
    version = client.get_model_version("restoray-adaptor", "1")
    assert version.run_id == run_id and version.tags["run_id"] == run_id
    # The artifacts went through the server into its S3 bucket (the training process had no S3 credentials to use).
    keys = [key for key in s3_keys(endpoint, MLFLOW_ARTIFACT_BUCKET) if key.startswith(f"runs/{run.info.experiment_id}/")]
    assert any(key.endswith(f"{run_id}/artifacts/validation/step_{STEPS:06d}.png") for key in keys), keys[:10]
    assert any(key.endswith("MLmodel") for key in keys) and any(key.endswith(".safetensors") for key in keys), keys[:10]

    # (A registered model restored through the server: test_autoscaling.py's restore-batch by alias. This run's
    # export is checked whole below, after the resumed run.)

    # The same run resumed by a second `restoray train` with more steps (now on the one node left).
    more_steps = sets(train__steps=STEPS + 2, train__register_model="false")
    more = restoray("train", "--config", CONFIG, *common, *more_steps, cwd=tmp_path, address=address, endpoint=endpoint)
    assert more.returncode == 0, more.stderr[-4000:]
    assert f"step {STEPS + 2}" in more.stdout and ", resumed)" in more.stdout
    assert _loss_steps(client, EXPERIMENT) == (run_id, list(range(1, STEPS + 3)))
    exports = sorted(fs.glob("train/runs/restoray-adaptor/checkpoint_*/export/training.json"))
    assert [json.loads(fs.cat_file(path))["step"] for path in exports] == [STEPS, STEPS + 2]  # each run exports at its end
    fs.get(exports[-1].rsplit("/", 1)[0], str(tmp_path / "export"), recursive=True)
    _assert_complete_export(tmp_path / "export", "model.")  # every tensor whole after ZeRO-3's gathering
