"""`restoray submit` against a real `ray start --head --block` cluster on 127.0.0.1."""

import subprocess
import sys
import uuid

import pytest

from tests.conftest import REPO_ROOT, RayHead, free_port


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node with 2 CPUs (tests.conftest.RayHead), token auth on."""
    head = RayHead("rs", ("--num-cpus=2",))
    yield {"address": head.address, "env": head.env, "token_path": head.token_path}
    head.stop()


def _submit(cluster, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "restoray", "submit", "--address", cluster["address"], *args],
        capture_output=True,
        text=True,
        env=env or cluster["env"],
        cwd=REPO_ROOT,
        timeout=300,
    )


def test_submitted_command_that_succeeds_exits_0_with_its_logs(ray_cluster):
    result = _submit(ray_cluster, "--", "list", "presets")
    assert result.returncode == 0, result.stderr
    # The job's own output, streamed back: the preset listing printed on the cluster.
    assert "tiny" in result.stdout and "stabilityai/stable-diffusion-xl-base-1.0" in result.stdout
    assert "SUCCEEDED" in result.stderr


def test_submitted_command_that_fails_exits_1(ray_cluster):
    result = _submit(ray_cluster, "--", "demo", "--set", "ray.num_cpu=1")
    assert result.returncode == 1, result.stderr
    assert "FAILED" in result.stderr
    # The job's error (exit 2 from the config check) reached the submitter's terminal.
    assert "unknown key 'ray.num_cpu'" in result.stdout + result.stderr


def test_wrong_token_and_unreachable_cluster_are_bad_input(ray_cluster):
    wrong_token = dict(ray_cluster["env"], RAY_AUTH_TOKEN=uuid.uuid4().hex)
    wrong_token.pop("RAY_AUTH_TOKEN_PATH")
    refused = _submit(ray_cluster, "--", "list", "presets", env=wrong_token)
    assert refused.returncode == 2, refused.stderr
    assert "RAY_AUTH_TOKEN" in refused.stderr

    nowhere = subprocess.run(
        [sys.executable, "-m", "restoray", "submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "list", "presets"],
        capture_output=True,
        text=True,
        env=ray_cluster["env"],
        timeout=120,
    )
    assert nowhere.returncode == 2
    assert "cannot reach the Ray Jobs API" in nowhere.stderr


def test_submitted_jobs_refuse_node_local_paths_and_train_on_the_cluster(ray_cluster, tmp_path):
    """A submitted data build with node-local paths is refused; a submitted training run on a dataset at a path
    declared shared trains and registers its model. (A submitted data build that runs: test_autoscaling.py.)"""
    from tests.integration.test_training import _abair_shards

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    output = tmp_path / "dataset"
    # The job runs on a cluster, whose nodes need not see this machine's files: local paths are refused there
    # unless declared a shared mount (one machine here: its /tmp is shared by construction).
    refused = _submit(ray_cluster, "--", "data", "build", "--input", str(corpus), "--output", str(output))
    assert refused.returncode == 1 and "connected to a Ray cluster" in refused.stdout + refused.stderr
    assert not output.exists()
    _abair_shards(output)

    # Training as a job on the cluster, fed by a dataset in the shard schema (two CPUs: half of one for the worker,
    # the rest for the Ray Data tasks that list, read and prepare its batches, which need a whole CPU to start).
    trained = _submit(
        ray_cluster,
        "--",
        "train", "--set", f"train.data={output}", "--set", f"train.storage_path={tmp_path / 'train'}",
        "--set", "storage.shared_filesystem=true",
        "--set", "train.cpus_per_worker=0.5", "--set", "train.steps=2", "--set", "train.checkpoint_every=2",
        "--set", "train.resolution=128", "--set", "train.validation_steps=1",
        "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "trained stage 'adaptor': step 2" in trained.stdout and "models:/restoray-adaptor/1" in trained.stdout
    assert list((tmp_path / "train" / "restoray-adaptor").glob("checkpoint_*/export/model.safetensors"))
