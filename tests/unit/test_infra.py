"""infra/: the image tag in one place, the KubeRay manifests rendered from the configs and validated strictly against
KubeRay's CRD schemas (tests/data/kuberay, copied from ray-project/kuberay at feeaf72f) and against the rules KubeRay's
operator enforces that the schemas do not (`kuberay_rules`), the MLflow server files, one faiss per image."""

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
from restoray.infra import JOBS, MANIFESTS, MAX_JOB_NAME, POOL_LABEL, image, render, render_job
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


SERVE_GRACE_S = 20 + 30  # Serve's graceful shutdown of a replica (20 s) and its proxy's draining (30 s)


def _pod_templates(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"], *(group["template"] for group in cluster_spec["workerGroupSpecs"])]


def kuberay_rules(document: dict) -> list[str]:
    """What KubeRay's operator refuses (or Ray recommends for KubeRay pods) that the CRD schemas do not say."""
    errors: list[str] = []
    kind, spec, name = document.get("kind"), document.get("spec", {}), document.get("metadata", {}).get("name", "")
    if kind == "RayJob":
        if len(name) > MAX_JOB_NAME:
            errors.append(f"RayJob name {name!r} longer than {MAX_JOB_NAME}")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append("ttlSecondsAfterFinished > 0 without shutdownAfterJobFinishes")
        if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
            errors.append("activeDeadlineSeconds must be > 0")
        if ("clusterSelector" in spec) == ("rayClusterSpec" in spec):
            errors.append("exactly one of clusterSelector and rayClusterSpec")
        if spec.get("shutdownAfterJobFinishes") and "clusterSelector" in spec:
            errors.append("shutdownAfterJobFinishes on a selected (shared) cluster")
    cluster = {"RayCluster": spec, "RayService": spec.get("rayClusterConfig"), "RayJob": spec.get("rayClusterSpec")}.get(kind)
    if cluster:
        groups = cluster["workerGroupSpecs"]
        if len({group["groupName"] for group in groups}) != len(groups):
            errors.append("worker group names repeat")
        for group in groups:
            if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
                errors.append(f"group {group['groupName']}: replicas outside [minReplicas, maxReplicas]")
        for template in _pod_templates(cluster):
            pod, container = template["spec"], template["spec"]["containers"][0]
            where = template["metadata"]["labels"]["app.kubernetes.io/component"]
            if container["resources"]["requests"] != container["resources"]["limits"]:
                errors.append(f"{where}: requests differ from limits")
            shm = [v for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
            mounted = {m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
            if not shm or shm[0]["name"] not in mounted or "sizeLimit" not in shm[0]["emptyDir"]:
                errors.append(f"{where}: no sized memory emptyDir at /dev/shm")
            if "ray stop" not in " ".join(container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])):
                errors.append(f"{where}: no preStop ray stop")
            if pod.get("terminationGracePeriodSeconds", 30) <= SERVE_GRACE_S:
                errors.append(f"{where}: terminationGracePeriodSeconds not longer than Serve's graceful shutdown")
    if kind == "RayService":
        if not spec.get("excludeHeadPodFromServeSvc"):
            errors.append("the serve Service includes the head pod")
        if not cluster.get("gcsFaultToleranceOptions", {}).get("redisAddress"):
            errors.append("no GCS fault tolerance: Serve stops answering while the head restarts")
        labels = [group.get("labels", {}) for group in cluster["workerGroupSpecs"]]
        for deployment in yaml.safe_load(spec["serveConfigV2"])["applications"][0]["deployments"]:
            selector = deployment["ray_actor_options"].get("label_selector")
            if selector and not any(selector.items() <= group.items() for group in labels):
                errors.append(f"deployment {deployment['name']}: no worker group has the labels {selector}")
    return errors


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
    assert sorted(kinds) == ["ConfigMap", "RayCluster", *["RayJob"] * len(JOBS), "RayService"]
    assert sorted(name for name in rendered if name.startswith("rayjob-")) == sorted(f"rayjob-{job}.yaml" for job in JOBS)
    for name, documents in rendered.items():
        for document in documents:
            assert _errors(validators, document) == [], name
            assert kuberay_rules(document) == [], name
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
    assert jobs["rayjob-restore-batch.yaml"]["entrypoint"].startswith(
        "restoray restore-batch --input s3://my-bucket/restoray/inbox --output s3://my-bucket/restoray/restored "
        "--weights models:/restoray-adaptor@production"
    )
    assert "restoray eval --weights models:/restoray-adaptor@production --protocol realesrgan-x4" in jobs["rayjob-eval.yaml"]["entrypoint"]
    assert all(spec["activeDeadlineSeconds"] > 0 and "ttlSecondsAfterFinished" not in spec for spec in jobs.values())
    assert rendered["restoray-config.yaml"][0]["data"]["run.toml"] == (REPO_ROOT / EXAMPLE).read_text()
    serve = yaml.safe_load(rendered["rayservice.yaml"][0]["spec"]["serveConfigV2"])
    assert serve["http_options"]["host"] == "0.0.0.0"
    application = serve["applications"][0]
    assert application["import_path"] == "serving.app:app_builder" and application["args"]["preset"] == "sdxl"
    assert {d["name"]: d["ray_actor_options"]["num_gpus"] for d in application["deployments"]}["Restorer"] == 1.0
    small = {d["name"] for d in application["deployments"] if d["ray_actor_options"].get("label_selector") == {POOL_LABEL: "serve-small"}}
    assert small == {"Ingress", "Captioner", "Retriever"}  # the light deployments on the small CPU group, not a 16-CPU worker
    service = rendered["rayservice.yaml"][0]["spec"]
    redis = service["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert redis["redisPassword"] == {"valueFrom": {"secretKeyRef": {"name": "restoray-redis", "key": "password"}}}
    groups = {group["groupName"]: group for group in service["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups["serve-small"]["labels"] == {POOL_LABEL: "serve-small"} and groups["serve-small"]["minReplicas"] >= 1
    text = "\n".join(yaml.safe_dump_all(documents) for documents in rendered.values())
    assert "secretRef" in text and not re.search(r"(?i)(password|secret_access_key|auth_token)\s*[:=]\s*(?!valueFrom)\S", text)
    # Every pod tracks to the environment's MLflow server (the config leaves mlflow.tracking_uri unset).
    env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.restoray.svc.cluster.local:5000"} in env


def test_committed_manifests_are_the_rendering_of_the_example_config():
    config = load_config(REPO_ROOT / EXAMPLE)
    for name, text in render(config, EXAMPLE).items():
        committed = REPO_ROOT / "infra" / "kuberay" / name
        assert committed.read_text() == text, f"{committed} is stale: restoray infra render --config {EXAMPLE} --output infra/kuberay"


def test_kuberay_rules_catch_what_the_schemas_let_through(validators, rendered):
    shared = copy.deepcopy(rendered["rayjob-train.yaml"][0])
    shared["spec"]["ttlSecondsAfterFinished"] = 600  # valid by the schema; KubeRay refuses it without shutdown
    shared["spec"]["activeDeadlineSeconds"] = 0
    shared["metadata"]["name"] = "x" * (MAX_JOB_NAME + 1)
    assert _errors(validators, shared) == []
    assert len(kuberay_rules(shared)) == 3, kuberay_rules(shared)
    cluster = copy.deepcopy(rendered["raycluster.yaml"][0])
    pod = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    pod["containers"][0]["resources"]["limits"]["memory"] = "128Gi"
    pod["volumes"] = [volume for volume in pod["volumes"] if volume["name"] != "dshm"]
    del pod["containers"][0]["lifecycle"]
    assert len(kuberay_rules(cluster)) == 3, kuberay_rules(cluster)


def test_jobs_on_their_own_clusters_and_a_fresh_job_to_run_again(validators):
    config = load_config(REPO_ROOT / EXAMPLE, ["infra.job_cluster=own", "infra.job_ttl_s=300", "infra.job_deadline_s=3600"])
    own = yaml.safe_load(render(config, EXAMPLE)["rayjob-eval.yaml"])
    spec = own["spec"]
    assert "clusterSelector" not in spec and spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] == 300
    assert spec["activeDeadlineSeconds"] == 3600 and spec["rayClusterSpec"]["enableInTreeAutoscaling"]
    assert _errors(validators, own) == [] and kuberay_rules(own) == []
    shared = load_config(REPO_ROOT / EXAMPLE)
    names = set()
    for _ in range(2):
        job = yaml.safe_load(render_job(shared, EXAMPLE, [], "restore-batch"))
        assert _errors(validators, job) == [] and kuberay_rules(job) == []
        assert re.fullmatch(r"restoray-restore-batch-[a-z0-9]{5}", job["metadata"]["name"])
        names.add(job["metadata"]["name"])
    assert len(names) == 2  # each rendering a new RayJob: kubectl apply starts the job again
    cli = subprocess.run([str(VENV_BIN / "restoray"), "infra", "job", "train", "--config", EXAMPLE], capture_output=True, text=True,
                         cwd=REPO_ROOT)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert yaml.safe_load(cli.stdout)["spec"]["entrypoint"] == "restoray train --config /etc/restoray/run.toml"
    long_name = load_config(REPO_ROOT / EXAMPLE, ["infra.name=" + "r" * 30])
    with pytest.raises(InputError, match=r"shorten infra\.name"):
        render_job(long_name, EXAMPLE, [], "restore-batch")
    with pytest.raises(InputError, match="choose one of data-build"):
        render_job(shared, EXAMPLE, [], "deploy")


def test_each_image_installs_one_faiss():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert not [d for d in pyproject["project"]["dependencies"] if d.startswith("faiss")]
    extras = pyproject["project"]["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["cpu"]] == ["faiss-cpu"] and [d.split(">")[0] for d in extras["gpu"]] == ["faiss-gpu"]
    assert "EXTRAS=$(if $(filter cuda,$(VARIANT)),gpu,cpu)" in (REPO_ROOT / "Makefile").read_text()
    assert 'ARG EXTRAS="cpu"' in (REPO_ROOT / "infra" / "docker" / "Dockerfile").read_text()


def test_render_names_the_missing_job_paths():
    config = load_config(overrides=["infra.data_input=s3://b/corpus"])  # the local default has no index output
    with pytest.raises(InputError, match=r"infra\.index_output") as err:
        render(config, REPO_ROOT / "restoray" / "defaults" / "local.toml")
    assert "infra.data_input" not in str(err.value) and "infra.restore_input" in str(err.value) and "infra.eval_data" in str(err.value)
    job_paths = ["infra.restore_input=s3://b/in", "infra.restore_output=s3://b/out", "infra.eval_data=s3://b/hq", "infra.eval_output=s3://b/e",
                 "infra.model=models:/restoray-adaptor/1"]  # fmt: skip
    local = load_config(
        overrides=["infra.data_input=s3://b/corpus", "infra.index_output=s3://b/index", "train.data=data/dataset", *job_paths]
    )
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
    assert config.infra.mlflow_tracking_uri == "http://mlflow.restoray.svc.cluster.local:5000"
    assert "s3://" in commands[1]
    assert Path(REPO_ROOT / "infra" / "mlflow" / "basic_auth.ini").read_text().count("admin_password = change-me-at-start") == 1
