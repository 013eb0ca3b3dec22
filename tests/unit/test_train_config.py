"""The [train] table, the DeepSpeed config generated from it, and the multi-node storage rule."""

import pytest

from restoration.errors import InputError
from restoray.config import load_config
from restoray.train import shared_storage_paths
from runtime.storage import as_path, check_shared_storage
from tests.conftest import REPO_ROOT
from training.trainer import deepspeed_config


def test_deepspeed_config_is_generated_from_ours():
    config = load_config(overrides=["train.zero_stage=3", "train.gpus_per_worker=1", "train.precision=bf16", "train.offload_optimizer=true",
                                    "train.batch_size=4", "train.grad_accum=2", "train.grad_clip=0.5"]).train  # fmt: skip
    generated = deepspeed_config(config)
    assert generated["zero_optimization"]["stage"] == 3
    assert generated["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert generated["zero_force_ds_cpu_optimizer"] is False  # a torch optimizer with offload
    assert generated["bf16"]["enabled"] and not generated["fp16"]["enabled"]
    assert (generated["train_micro_batch_size_per_gpu"], generated["gradient_accumulation_steps"], generated["gradient_clipping"]) == (
        4,
        2,
        0.5,
    )
    cpu = deepspeed_config(load_config().train)
    assert cpu["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in cpu["zero_optimization"] and not cpu["bf16"]["enabled"]


def test_a_cluster_needs_shared_storage():
    local = load_config(overrides=["train.data=data/demo/dataset", "train.storage_path=data/train", "train.init_from=./weights"])
    paths = shared_storage_paths(local)
    check_shared_storage(False, paths, local.storage, "sqlite:///mlflow.db")  # the embedded instance: local paths are fine
    with pytest.raises(InputError) as err:  # any cluster, whatever its nodes now: a scaled-to-zero one has one
        check_shared_storage(True, paths, local.storage, "sqlite:///mlflow.db")
    message = str(err.value)
    assert "connected to a Ray cluster" in message and "mlflow.tracking_uri" in message
    assert all(name in message for name in ("train.storage_path", "train.data", "train.init_from='./weights'"))
    shared = load_config(overrides=["train.data=s3://b/ds", "train.storage_path=s3://b/train", "train.init_from=models:/a/1"])
    check_shared_storage(True, shared_storage_paths(shared), shared.storage, "http://mlflow:5000")
    mounted = load_config(overrides=["train.data=/mnt/shared/ds", "train.storage_path=/mnt/shared/train", "storage.shared_filesystem=true"])
    check_shared_storage(True, shared_storage_paths(mounted), mounted.storage, "sqlite:////mnt/shared/mlflow.db")
    # The same check for the jobs that name paths on the command line (data build, index build, restore-batch, eval);
    # preset names and Hugging Face ids are no paths.
    with pytest.raises(InputError, match=r"--output='data/out'") as err:
        check_shared_storage(True, {"--input": "s3://b/corpus", "--output": "data/out", "--weights": as_path("org/model")}, local.storage)
    assert "--input" not in str(err.value) and "mlflow" not in str(err.value) and "--weights" not in str(err.value)
    assert as_path("tiny") is None and as_path("s3://b/w") is None and as_path("/abs/w") == "/abs/w"


def test_train_keys_are_validated_with_the_config():
    from restoration.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.zero_stage"):
        load_config(overrides=["train.zero_stage=1"])
    with pytest.raises(ConfigError, match="needs GPUs"):
        load_config(overrides=["train.precision=fp16"])


def test_a_restarted_attempt_logs_each_step_once_keeping_the_first_values(tmp_path):
    import mlflow

    from training.tracking import RankZeroLogger

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    first = RankZeroLogger(tracking, run_id, enabled=True)
    for step in (1, 2, 3):  # checkpoint at step 2, then the node is lost after step 3 was logged
        first.metrics(step, {"loss": float(step)})
    restarted = RankZeroLogger(tracking, run_id, enabled=True)  # resumes from step 2's checkpoint
    for step in (3, 4):
        restarted.metrics(step, {"loss": 10.0 * step, "psnr": 20.0})
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "psnr")] == [(3, 20.0), (4, 20.0)]
    RankZeroLogger(tracking, run_id, enabled=False).metrics(5, {"loss": 1.0})  # ranks other than 0 log nothing
    assert max(m.step for m in client.get_metric_history(run_id, "loss")) == 4


def test_the_training_feed_is_placed_by_labels_without_the_deprecated_exclude_resources():
    import warnings

    from ray.data import DataContext

    from training.trainer import _ingest_options

    DataContext.get_current()  # its own deprecation warnings, at creation, are Ray's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Ray Train's default_ingest_options() copies exclude_resources: a RayDeprecationWarning
        options = _ingest_options(True, {"restoray.io/pool": "cpu"})
        anywhere = _ingest_options(False, {})
    assert options.label_selector == {"restoray.io/pool": "cpu"} and options.preserve_order
    assert anywhere.label_selector is None and not anywhere.preserve_order
    assert load_config(REPO_ROOT / "configs" / "cluster.example.toml").train.data_label_selector == {"restoray.io/pool": "cpu"}
