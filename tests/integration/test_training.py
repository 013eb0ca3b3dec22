"""`restoray train`: bad input refused before workers start, and the ABAIR stage chain (an expert on an adaptor,
then the estimator) into one model. Two workers with DeepSpeed ZeRO-3 on two Ray nodes, a lost node, the MLflow
server with S3 artifacts, the model registered, and a run resumed by name: test_multinode.py."""

import json
import subprocess
import sys

import pytest
import torch

from restoration.restorer import Restorer
from restoration.sampling.edm import SamplerConfig
from restoray.config import DEFAULT_CONFIG
from tests.conftest import subprocess_env

CONFIG = str(DEFAULT_CONFIG)  # the packaged embedded default


def restoray(*args: str, cwd, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    environment = subprocess_env(**env)
    environment.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "restoray", *args], capture_output=True, text=True, cwd=cwd, env=environment, timeout=timeout
    )


def sets(**values) -> list[str]:
    return [item for key, value in values.items() for item in ("--set", f"{key.replace('__', '.')}={value}")]


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


def test_bad_training_input_is_refused_before_workers_start(tmp_path):
    dataset = _abair_shards(tmp_path / "shards")
    too_few = restoray("train", "--config", CONFIG, *sets(train__data=dataset, train__stage="experts", train__expert="rain",
                       train__batch_size=5000, train__storage_path=tmp_path / "t"), cwd=tmp_path)  # fmt: skip
    assert too_few.returncode == 2 and "needs at least 5000 `single` rows of type 'rain'" in too_few.stderr
    unknown = restoray("train", "--config", CONFIG, *sets(train__stage="experts", train__expert="smudge"), cwd=tmp_path)
    assert unknown.returncode == 2 and "smudge" in unknown.stderr and "noise" in unknown.stderr
    missing = restoray("train", "--config", CONFIG, *sets(train__data=tmp_path / "nothing"), cwd=tmp_path)
    assert missing.returncode == 2 and "no readable parquet shards" in missing.stderr
    crowded = restoray("train", "--config", CONFIG, *sets(train__data=dataset, train__cpus_per_worker=2), cwd=tmp_path)
    assert crowded.returncode == 2 and "lower train.cpus_per_worker" in crowded.stderr  # not a silent wait for data
    # Declared autoscaling, the same run is not refused: it waits for nodes that never come (Ray Train would retry the
    # worker group forever), saying so, and stops after ray.resource_wait_s with exit 1 naming the resources.
    waited = restoray("train", "--config", CONFIG, *sets(train__data=dataset, train__cpus_per_worker=2, train__storage_path=tmp_path / "w",
                      ray__autoscaling="true", ray__resource_wait_s=5), cwd=tmp_path)  # fmt: skip
    assert waited.returncode == 1, waited.stderr[-3000:]
    assert "waiting for the autoscaler: the training worker group (1 workers) need 3 CPU" in waited.stderr, waited.stderr[-3000:]
    assert "ray.resource_wait_s" in waited.stderr and "lacks 1 CPU" in waited.stderr
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


def _adaptor_weights(path, trained: bool):
    """The tiny preset saved as an adaptor, its connectors perturbed when `trained` (what the expert stage checks
    for: a LoRA expert cannot learn through zero-initialised connectors). Training the adaptor stage itself runs in the
    demo, on two nodes (test_multinode.py) and as a submitted job (test_submit.py)."""
    restorer = Restorer("tiny")
    if trained:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in restorer.model.connectors.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    restorer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_expert_then_estimator_chain_onto_an_adaptor_into_one_model(tmp_path):
    """ABAIR's stages after the adaptor: a LoRA expert trained on it (in bf16, DeepSpeed's CPU backend), then the
    estimator on the adaptor with its expert, into one model."""
    data = _abair_shards(tmp_path / "abair")
    train = tmp_path / "train"

    def run(stage: str, **extra) -> subprocess.CompletedProcess:
        args = sets(train__data=data, train__stage=stage, train__steps=2, train__checkpoint_every=2, train__resolution=128,
                    train__validation_steps=1, train__storage_path=train, mlflow__tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                    **extra)  # fmt: skip
        return restoray("train", "--config", CONFIG, *args, cwd=tmp_path)

    untrained = run("experts", train__expert="noise", train__init_from=_adaptor_weights(tmp_path / "untrained", trained=False))
    assert untrained.returncode == 2 and "set train.init_from to a trained adaptor" in untrained.stderr
    adaptor = _adaptor_weights(tmp_path / "adaptor", trained=True)
    expert = run("experts", train__expert="noise", train__lr=1e-2, train__init_from=adaptor, train__precision="bf16")
    assert expert.returncode == 0, expert.stderr[-3000:]
    assert "frozen networks held in bf16: unet, vae, text_encoder, text_encoder_2, encoder" in expert.stderr + expert.stdout
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
