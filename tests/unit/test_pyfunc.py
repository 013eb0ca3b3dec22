"""The logged MLflow model carries our code and pinned requirements: `mlflow.pyfunc.load_model(...).predict` in a
fresh process outside the repository uses the code inside the model, not the checkout."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from restoration.restorer import Restorer
from tests.conftest import subprocess_env

PREDICT = r"""
import io, json, sys
import mlflow, numpy as np, pandas as pd
from PIL import Image
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
import restoration
buffer = io.BytesIO()
Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(buffer, format="PNG")
out = model.predict(pd.DataFrame({"image": [buffer.getvalue()], "prompt": ["a grey wall"], "steps": [2], "seed": [3]}))
image = Image.open(io.BytesIO(out["image"][0]))
answer = {"restoration": restoration.__file__, "size": list(image.size), "caption": out["caption"][0]}
print(json.dumps({**answer, "seed": int(out["seed"][0])}))
"""


def test_logged_model_predicts_in_a_fresh_process_from_its_own_code(tmp_path):
    import mlflow

    from training.tracking import MODEL_REQUIREMENTS, log_model

    restorer = Restorer("tiny")
    with torch.no_grad():
        for block in restorer.model.connectors:
            for connector in block:
                connector.gamma.weight.normal_(0, 0.01)
    restorer.save_pretrained(tmp_path / "export")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking)
    run = client.create_run(client.create_experiment("pyfunc", artifact_location=str(tmp_path / "artifacts")))
    log_model(tracking, run.info.run_id, str(tmp_path / "export"), "adaptor", register=False, tags={})
    model_uri = f"runs:/{run.info.run_id}/model"

    model_dir = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "downloaded"), tracking_uri=tracking)
    requirements = (tmp_path / "downloaded" / "model" / "requirements.txt").read_text()
    assert all(f"{name}==" in requirements for name in MODEL_REQUIREMENTS), requirements
    assert (tmp_path / "downloaded" / "model" / "code" / "restoration" / "models" / "preset_files" / "tiny.toml").is_file(), model_dir

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", PREDICT, tracking, model_uri], capture_output=True, text=True, cwd=outside, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert "/model/code/restoration/" in answer["restoration"], answer  # the model's copy, not the repository's
    assert answer["size"] == [64, 48] and answer["caption"] == "a grey wall" and answer["seed"] == 3
