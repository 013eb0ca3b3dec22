import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

from restoray.config import load_config
from tests.conftest import REPO_ROOT


def _cluster():
    return yaml.safe_load((REPO_ROOT / "ray_cluster.yaml").read_text())


def test_cluster_config_validates_against_rays_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [error.message for error in validator.iter_errors(_cluster())] == []
    # The schema does catch mistakes: a misspelt top-level key is refused.
    broken = dict(_cluster(), max_worker=3)
    assert any("max_worker" in error.message for error in validator.iter_errors(broken))


def test_cluster_config_has_the_node_roles_and_runs_the_image():
    cluster = _cluster()
    assert cluster["provider"]["type"] == "aws"
    node_types = cluster["available_node_types"]
    head = node_types[cluster["head_node_type"]]
    assert "GPU" not in head["resources"]
    cpu_workers = [t for name, t in node_types.items() if name != cluster["head_node_type"] and not t["resources"].get("GPU")]
    gpu_workers = [t for t in node_types.values() if t["resources"].get("GPU", 0) > 0]
    assert cpu_workers and gpu_workers
    setup = "\n".join(cluster["setup_commands"])
    # restoray comes with the container image (its tags: tests/unit/test_infra.py), not from a set-up command.
    assert "pip install" not in setup and cluster["docker"]["image"].startswith("ghcr.io/restoray/restoray:")
    assert gpu_workers[0]["docker"]["worker_image"].endswith("-cuda")
    # The run config's bucket, no variable that nothing reads, MLflow from the nodes' environment (the example config
    # leaves mlflow.tracking_uri unset: a value there would override the variable), autoscaling declared.
    text = (REPO_ROOT / "ray_cluster.yaml").read_text()
    example = load_config(REPO_ROOT / "configs" / "cluster.example.toml")
    assert "RESTORAY_SHARED_STORAGE" not in text and "MLFLOW_TRACKING_URI" in setup
    assert f"s3://{example.train.data.split('/')[2]}" in text and example.mlflow.tracking_uri is None
    assert example.ray.autoscaling is True and all(t["min_workers"] == 0 for t in cpu_workers + gpu_workers)
    # The training feed's label selector finds the CPU workers, as it finds KubeRay's CPU group.
    assert [t["labels"] for t in cpu_workers] == [example.train.data_label_selector] != [t["labels"] for t in gpu_workers]
    assert any("ray start --head" in command for command in cluster["head_start_ray_commands"])
