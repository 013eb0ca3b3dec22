"""infra/: the image tag in one place, the KubeRay manifests rendered from the configs and validated strictly against
KubeRay's CRD schemas (tests/data/kuberay, copied from ray-project/kuberay at feeaf72f), the MLflow server files."""

import copy
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from restoration.errors import InputError
from restoray.config import load_config
from restoray.infra import MANIFESTS, image, render
from tests.conftest import REPO_ROOT, VENV_BIN

KUBERAY = REPO_ROOT / "tests" / "data" / "kuberay"
EXAMPLE = "configs/cluster.example.toml"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}


def _strict(schema):
    """What `kubectl apply --validate=strict` checks: an object schema that lists properties and does not preserve
    unknown fields admits no other key."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def validators():
    found = {}
    for kind, name in CRDS.items():
        crd = yaml.safe_load((KUBERAY / name).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        found[kind] = jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return found


def _errors(validators, document) -> list[str]:
    if document.get("apiVersion") != "ray.io/v1":
        return []  # ConfigMaps, Secrets: not KubeRay's
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[document["kind"]].iter_errors(document)]


@pytest.fixture(scope="module")
def rendered():
    config = load_config(REPO_ROOT / EXAMPLE)
    return {name: list(yaml.safe_load_all(text)) for name, text in render(config, EXAMPLE).items()}


def test_kuberay_samples_pass_the_strict_check(validators):
    samples = sorted(KUBERAY.glob("ray-*.yaml"))
    assert len(samples) == 4
    for sample in samples:
        for document in yaml.safe_load_all(sample.read_text()):
            assert _errors(validators, document) == [], sample.name


def test_rendered_manifests_validate_strictly_and_a_misspelt_field_is_caught(validators, rendered):
    assert sorted(rendered) == sorted(MANIFESTS)
    kinds = [document["kind"] for documents in rendered.values() for document in documents]
    assert sorted(kinds) == ["ConfigMap", "RayCluster", "RayJob", "RayJob", "RayJob", "RayService"]
    for name, documents in rendered.items():
        for document in documents:
            assert _errors(validators, document) == [], name
    job = copy.deepcopy(rendered["rayjob-train.yaml"][0])
    job["spec"]["entrypointt"] = job["spec"].pop("entrypoint")
    assert any("entrypointt" in error for error in _errors(validators, job))
    cluster = copy.deepcopy(rendered["raycluster.yaml"][0])
    cluster["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in error for error in _errors(validators, cluster))


def test_the_manifests_carry_the_config_and_no_credential(rendered):
    cluster = rendered["raycluster.yaml"][0]["spec"]
    assert cluster["enableInTreeAutoscaling"] and cluster["authOptions"] == {"mode": "token", "secretName": "restoray-ray-token"}
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "4" and gpu["image"] == image().tag("cuda")
    assert groups["cpu"]["template"]["spec"]["containers"][0]["image"] == image().tag("cpu")
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    jobs = {name: documents[0]["spec"] for name, documents in rendered.items() if name.startswith("rayjob-")}
    assert all(spec["clusterSelector"] == {"ray.io/cluster": "restoray"} for spec in jobs.values())
    build = jobs["rayjob-data-build.yaml"]["entrypoint"]
    assert build.startswith(
        "restoray data build --input s3://my-bucket/restoray/corpora/laion-hq --output s3://my-bucket/restoray/datasets/laion-hq"
    )
    assert jobs["rayjob-train.yaml"]["entrypoint"] == "restoray train --config /etc/restoray/run.toml"
    assert rendered["restoray-config.yaml"][0]["data"]["run.toml"] == (REPO_ROOT / EXAMPLE).read_text()
    serve = yaml.safe_load(rendered["rayservice.yaml"][0]["spec"]["serveConfigV2"])
    assert serve["http_options"]["host"] == "0.0.0.0"
    application = serve["applications"][0]
    assert application["import_path"] == "serving.app:app_builder" and application["args"]["preset"] == "sdxl"
    assert {d["name"]: d["ray_actor_options"]["num_gpus"] for d in application["deployments"]}["Restorer"] == 1.0
    text = "\n".join(yaml.safe_dump_all(documents) for documents in rendered.values())
    assert "secretRef" in text and not re.search(r"(?i)(password|secret_access_key|auth_token)\s*[:=]\s*\S", text)


def test_committed_manifests_are_the_rendering_of_the_example_config():
    config = load_config(REPO_ROOT / EXAMPLE)
    for name, text in render(config, EXAMPLE).items():
        committed = REPO_ROOT / "infra" / "kuberay" / name
        assert committed.read_text() == text, f"{committed} is stale: restoray infra render --config {EXAMPLE} --output infra/kuberay"


def test_render_names_the_missing_job_paths():
    config = load_config(overrides=["infra.data_input=s3://b/corpus"])  # the local default has no index output
    with pytest.raises(InputError, match=r"infra\.index_output") as err:
        render(config, REPO_ROOT / "restoray" / "defaults" / "local.toml")
    assert "infra.data_input" not in str(err.value)
    local = load_config(overrides=["infra.data_input=s3://b/corpus", "infra.index_output=s3://b/index", "train.data=data/dataset"])
    with pytest.raises(InputError, match=r"train\.data='data/dataset'") as err:  # pods on other nodes cannot read it
        render(local, REPO_ROOT / "restoray" / "defaults" / "local.toml")
    assert "infra.data_output='data/dataset'" in str(err.value) and "infra.data_input" not in str(err.value)


def test_the_image_tag_is_written_once_and_matches_the_pins():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    current = image()
    assert current.ray_version in SpecifierSet(ray_pin.split("]", 1)[1])
    assert f"3.{current.python.removeprefix('py3')}" in SpecifierSet(pyproject["project"]["requires-python"])
    assert current.base_tag("cuda") == f"rayproject/ray:{current.ray_version}-py311-gpu"
    cluster = yaml.safe_load((REPO_ROOT / "ray_cluster.yaml").read_text())
    assert cluster["docker"]["image"] == current.tag("cpu")
    assert cluster["available_node_types"]["gpu_worker"]["docker"]["worker_image"] == current.tag("cuda")
    printed = subprocess.run([str(VENV_BIN / "restoray"), "infra", "image", "--variant", "cuda", "--base"], capture_output=True, text=True)
    assert printed.returncode == 0 and printed.stdout.strip() == current.base_tag("cuda")


def test_the_dockerfile_installs_the_wheel_and_nothing_else():
    dockerfile = (REPO_ROOT / "infra" / "docker" / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith(("#", " "))]
    assert "FROM ${BASE_IMAGE}" in instructions and "ARG BASE_IMAGE" in instructions  # no default: make image passes it
    code = "\n".join(line for line in dockerfile.splitlines() if not line.startswith("#"))
    assert re.findall(r"pip install[^;]*", code) == ['pip install --no-cache-dir "${target}"']
    assert "restoray-*.whl" in dockerfile
    ignored = [line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignored == ["*", "!dist/restoray-*.whl"]
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "restoray infra image --base --variant $(VARIANT)" in makefile and "pip wheel --quiet --no-deps -w dist ." in makefile


def test_the_mlflow_server_files_use_flags_mlflow_has():
    help_text = subprocess.run([str(VENV_BIN / "mlflow"), "server", "--help"], capture_output=True, text=True).stdout
    compose = yaml.safe_load((REPO_ROOT / "infra" / "mlflow" / "docker-compose.yaml").read_text())
    kubernetes = list(yaml.safe_load_all((REPO_ROOT / "infra" / "mlflow" / "kubernetes.yaml").read_text()))
    commands = [compose["services"]["mlflow"]["command"][-1], kubernetes[0]["spec"]["template"]["spec"]["containers"][0]["args"][0]]
    for command in commands:
        flags = set(re.findall(r"(--[a-z-]+)", command.split("mlflow server", 1)[1]))
        assert {"--artifacts-destination", "--allowed-hosts", "--app-name", "--backend-store-uri"} <= flags
        assert all(flag in help_text for flag in flags), flags
        assert "--app-name basic-auth" in command
    service = kubernetes[1]
    assert service["kind"] == "Service" and service["metadata"]["name"] == "mlflow"
    hosts = re.search(r"--allowed-hosts (\S+)", commands[1]).group(1).split(",")
    assert "mlflow.restoray.svc.cluster.local:5000" in hosts
    config = load_config(REPO_ROOT / EXAMPLE)
    assert config.mlflow.tracking_uri == "http://mlflow.restoray.svc.cluster.local:5000"
    assert "s3://" in commands[1]
    assert Path(REPO_ROOT / "infra" / "mlflow" / "basic_auth.ini").read_text().count("admin_password = change-me-at-start") == 1
