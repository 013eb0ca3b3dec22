"""`restoray train` end to end: 2 Ray Train workers with DeepSpeed on CPU, shards from a real `data build`,
ZeRO-3 with a worker failure recovered from a checkpoint and a real MLflow server (S3 artifacts); the ABAIR stage chain.
ZeRO-2 on two nodes, a lost node and a resumed run: test_multinode.py."""

import json
import subprocess
import sys

import pytest
import torch

from restoration.restorer import Restorer
from restoration.sampling.edm import SamplerConfig
from restoray.config import DEFAULT_CONFIG
from tests.conftest import MLFLOW_ARTIFACT_BUCKET, REPO_ROOT, s3_keys, subprocess_env

CONFIG = str(DEFAULT_CONFIG)  # the packaged embedded default


def restoray(*args: str, cwd, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    environment = subprocess_env(**env)
    environment.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "restoray", *args], capture_output=True, text=True, cwd=cwd, env=environment, timeout=timeout
    )


def sets(**values) -> list[str]:
    return [item for key, value in values.items() for item in ("--set", f"{key.replace('__', '.')}={value}")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from restoray.samples import materialise

    root = tmp_path_factory.mktemp("training-data")
    materialise(str(root / "samples"))
    # Without the generated negatives: the demo test covers them; these tests are about training.
    build = ("data", "build", "--input", str(root / "samples"), "--output", str(root / "dataset"), "--config", CONFIG)
    result = restoray(*build, "--set", "data.negatives.count=0", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "dataset"


def _assert_complete_export(weights, trained_part: str) -> Restorer:
    """Every trained tensor present with its full shape (no empty ZeRO partitions), and training changed them."""
    loaded = Restorer.from_pretrained(weights)
    fresh = Restorer("tiny").trained_state()
    state = loaded.trained_state()
    assert state.keys() == fresh.keys()
    assert all(state[k].shape == fresh[k].shape and state[k].numel() > 0 for k in state)
    changed = [k for k in state if k.startswith(trained_part) and not torch.equal(state[k], fresh[k])]
    assert changed, f"no {trained_part} weight changed in training"
    untouched = [k for k in state if not k.startswith(trained_part) and not torch.equal(state[k], fresh[k])]
    assert not untouched, f"weights outside {trained_part} changed: {untouched[:3]}"
    return loaded


@pytest.mark.slow
def test_zero3_two_workers_survive_a_failure_and_register_the_model(dataset, mlflow_server, moto_endpoint, tmp_path):
    import mlflow

    storage = tmp_path / "train"
    args = sets(
        train__data=dataset, train__storage_path=storage, train__num_workers=2, train__cpus_per_worker=0.5, train__zero_stage=3,
        train__steps=4, train__checkpoint_every=2, train__max_failures=1, mlflow__tracking_uri=mlflow_server,
    )  # fmt: skip
    result = restoray("train", "--config", CONFIG, *args, cwd=tmp_path, RESTORAY_FAULTS="train.fail_at_step=3")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "model: models:/restoray-adaptor/1" in result.stdout
    # The last rank raised at step 3; FailureConfig restarted both workers from the step-2 checkpoint.
    assert (storage / "restoray-adaptor" / "fail_once.marker").read_text().startswith("failed once at step 3")

    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("restoray-local").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["config.train.zero_stage"] == "3" and run.data.params["dataset.manifest_id"] != "None"
    assert run.data.tags["restoray.dataset"] == str(dataset) and run.data.tags["restoray.code_version"]
    steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4]  # steps 1-2 before the failure, 3-4 after the restart: none twice
    assert {"lr", "samples_per_s", "memory_mb"} <= set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "validation")] == ["validation/step_000004.png"]
    # The validation restoration scored with `restoray eval`'s code under its metric names.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "psnr")] == [4] and 0 < run.data.metrics["psnr"] < 100
    assert -1 <= run.data.metrics["ssim"] <= 1
    version = client.get_model_version("restoray-adaptor", "1")
    assert version.run_id == run.info.run_id and version.tags["run_id"] == run.info.run_id
    # The artifacts went through the server into its S3 bucket (the training process had no S3 credentials to use).
    keys = [key for key in s3_keys(moto_endpoint, MLFLOW_ARTIFACT_BUCKET) if key.startswith(f"runs/{run.info.experiment_id}/")]
    assert any(key.endswith(f"{run.info.run_id}/artifacts/validation/step_000004.png") for key in keys), keys[:10]
    assert any(key.endswith("MLmodel") for key in keys) and any(key.endswith(".safetensors") for key in keys), keys[:10]

    checkpoint_export = next((storage / "restoray-adaptor").glob("checkpoint_*/export"))
    assert json.loads((checkpoint_export / "training.json").read_text())["step"] == 4
    _assert_complete_export(checkpoint_export, "model.")

    image = REPO_ROOT / "restoray" / "samples.toml"  # not an image: the restore must refuse it clearly
    bad = restoray("restore", str(image), "--output", str(tmp_path / "x.png"), "--weights", "models:/restoray-adaptor/1", cwd=tmp_path,
                   MLFLOW_TRACKING_URI=mlflow_server)  # fmt: skip
    assert bad.returncode == 2
    photo = next((dataset.parent / "samples").glob("*.png"))
    restored = restoray("restore", str(photo), "--output", str(tmp_path / "out.png"), "--weights", "models:/restoray-adaptor/1",
                        "--steps", "2", "--prompt", "a photo", cwd=tmp_path, MLFLOW_TRACKING_URI=mlflow_server)  # fmt: skip
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert (tmp_path / "out.png").stat().st_size > 0


def test_bad_training_input_is_refused_before_workers_start(dataset, tmp_path):
    too_few = restoray("train", "--config", CONFIG, *sets(train__data=dataset, train__stage="experts", train__expert="rain",
                       train__batch_size=5000, train__storage_path=tmp_path / "t"), cwd=tmp_path)  # fmt: skip
    assert too_few.returncode == 2 and "needs at least 5000 `single` rows of type 'rain'" in too_few.stderr
    unknown = restoray("train", "--config", CONFIG, *sets(train__stage="experts", train__expert="smudge"), cwd=tmp_path)
    assert unknown.returncode == 2 and "smudge" in unknown.stderr and "noise" in unknown.stderr
    missing = restoray("train", "--config", CONFIG, *sets(train__data=tmp_path / "nothing"), cwd=tmp_path)
    assert missing.returncode == 2 and "no readable parquet shards" in missing.stderr
    crowded = restoray("train", "--config", CONFIG, *sets(train__data=dataset, train__cpus_per_worker=2), cwd=tmp_path)
    assert crowded.returncode == 2 and "lower train.cpus_per_worker" in crowded.stderr  # not a silent wait for data
    bad_stage = restoray("train", "--config", CONFIG, *sets(train__stage="everything"), cwd=tmp_path)
    assert bad_stage.returncode == 2 and "train.stage" in bad_stage.stderr


def _abair_shards(root):
    """A small dataset in the shard schema of `data build` with `single` noise rows and `composite` rows (the
    sample-photo build draws kinds at random, so it may hold neither)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import skimage.data
    from PIL import Image

    from restoration.degradations import composite_degrade, single_degrade
    from restoration.images import encode_mask_png, encode_png

    rng = np.random.default_rng(0)
    photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut()]
    rows = []
    for index in range(6):
        hq = np.asarray(Image.fromarray(photos[index % 3]).resize((128, 128)))
        sample = single_degrade(hq, rng, 1) if index % 2 == 0 else composite_degrade(hq, rng)
        rows.append({
            "id": f"row{index}", "source": f"synthetic://{index}", "caption": "a photo", "alt_text": None,
            "hq": encode_png(sample.hq), "lq": encode_png(sample.lq), "height": 128, "width": 128, "kind": sample.kind,
            "degradation": json.dumps(sample.ops), "restoration_prompt": sample.restoration_prompt,
            "mask": encode_mask_png(sample.mask), "quality": "{}",
        })  # fmt: skip
    (root / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "shards" / "part-00000.parquet")
    return root


@pytest.mark.slow
def test_adaptor_then_expert_then_estimator_chain_into_one_model(tmp_path):
    data = _abair_shards(tmp_path / "abair")
    train = tmp_path / "train"

    def run(stage: str, **extra) -> subprocess.CompletedProcess:
        args = sets(train__data=data, train__stage=stage, train__steps=2, train__checkpoint_every=2, train__resolution=128,
                    train__validation_steps=1, train__storage_path=train, mlflow__tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                    **extra)  # fmt: skip
        return restoray("train", "--config", CONFIG, *args, cwd=tmp_path)

    untrained = run("experts", train__expert="noise")
    assert untrained.returncode == 2 and "set train.init_from to a trained adaptor" in untrained.stderr
    assert run("adaptor", train__lr=1e-3).returncode == 0
    adaptor = next((train / "restoray-adaptor").glob("checkpoint_*/export"))
    expert = run("experts", train__expert="noise", train__lr=1e-2, train__init_from=adaptor)
    assert expert.returncode == 0, expert.stderr[-3000:]
    assert "models:/restoray-experts/1" in expert.stdout
    experts = next((train / "restoray-experts").glob("checkpoint_*/export"))
    estimator = run("estimator", train__init_from=experts)
    assert estimator.returncode == 0, estimator.stderr[-3000:]
    final = Restorer.from_pretrained(next((train / "restoray-estimator").glob("checkpoint_*/export")))
    assert final.experts == {"names": ["noise"], "rank": 4} and final.estimator is not None
    lora = {k: v for k, v in final.trained_state().items() if "lora_B.noise" in k}
    assert lora and any(v.any() for v in lora.values())  # the expert learned on the trained adaptor
    fresh_estimator = Restorer("tiny", estimator={"type_ids": final.estimator.type_ids}).estimator.state_dict()
    assert any(not torch.equal(v, fresh_estimator[k]) for k, v in final.estimator.state_dict().items())
    import skimage.data
    from PIL import Image

    photo = Image.fromarray(skimage.data.chelsea()).resize((64, 64))
    assert final.restore(photo, prompt="a cat", sampler=SamplerConfig(steps=1), expert_weights="one_hot").image.size == (64, 64)
