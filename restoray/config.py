"""Run configuration: one pydantic model per component, TOML files in `configs/`, `--set a.b=c` overrides.

A config is loaded in three steps, all before any work starts:
1. the TOML file (the packaged `restoray/defaults/local.toml` when none is given) is parsed;
2. each `--set key=value` is checked against the model's keys and written into that dict;
3. the whole dict is validated by `RunConfig` in strict mode.

Any unknown key or wrong type raises `ConfigError` (exit code 2) with a message naming the key, the source
(file or `--set`), what was expected, and the nearest valid keys.
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from pipelines.config import DataBuildConfig, EvalConfig, IndexConfig, RestoreBatchConfig
from restoration.config_model import StrictModel
from restoration.errors import ConfigError
from restoration.settings import RestoreConfig, SamplerConfig
from runtime.config import MlflowConfig, StorageConfig
from serving.config import ServeConfig
from training.config import TrainConfig

# The embedded default run ships inside the package (a wheel works in an empty directory); configs/ in the
# repository holds users' and cluster examples.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "defaults" / "local.toml"


class RayConfig(StrictModel):
    address: str | None = Field(
        None,
        description="Ray cluster to connect to ('auto', 'host:6379' or 'ray://host:10001'). "
        "Unset: RAY_ADDRESS if set, else an embedded local instance in this process.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs the embedded local instance may use; unset = all of this machine's.")
    namespace: str = Field("restoray", description="Ray namespace for named actors and jobs.")
    autoscaling: bool | Literal["auto"] = Field(
        "auto",
        description="Whether the cluster adds nodes for what a job schedules. true: a job never refuses for CPUs/GPUs "
        "missing now, and waits up to resource_wait_s for them; false: jobs that cannot fit the cluster as it is are "
        "refused (exit 2); 'auto': true where Ray shows an autoscaler (autoscaler v2, or the v1 monitor running an "
        "autoscaling config), else false (the embedded instance is never autoscaling).",
    )
    resource_wait_s: float = Field(
        600.0,
        gt=0,
        description="On an autoscaling cluster: how long a job waits for the resources it schedules before it stops (exit 1, naming them).",
    )


class SamplesConfig(StrictModel):
    dir: str = Field(
        "data/samples",
        description="Where the bundled sample corpus is materialised (image folder with same-stem .txt captions).",
    )


K8S_NAME = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"  # a DNS-1035 label, short enough for KubeRay's derived names
K8S_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$"


class PodGroupConfig(StrictModel):
    """One pod group of the KubeRay cluster: what each pod requests (and is limited to)."""

    cpu: int = Field(ge=1, description="CPUs per pod.")
    memory: str = Field(pattern=K8S_QUANTITY, description="Memory per pod, a Kubernetes quantity ('64Gi').")
    gpu: int = Field(0, ge=0, description="NVIDIA GPUs per pod (the CUDA image is used where > 0).")
    min_replicas: int = Field(0, ge=0, description="Pods the autoscaler keeps (worker groups).")
    max_replicas: int = Field(1, ge=1, description="Pods the autoscaler may start (worker groups).")


class InfraConfig(StrictModel):
    """`restoray infra render`: the KubeRay manifests (RayCluster, RayJobs, RayService) of this run."""

    name: str = Field("restoray", pattern=K8S_NAME, description="RayCluster name; the jobs and the RayService derive theirs from it.")
    namespace: str = Field("default", pattern=K8S_NAME, description="Kubernetes namespace of every rendered object.")
    repository: str | None = Field(None, description="Image repository; unset: the packaged one (restoray/templates/image.toml).")
    head: PodGroupConfig = Field(default_factory=lambda: PodGroupConfig(cpu=4, memory="16Gi"), description="The head pod (runs no tasks).")
    cpu_workers: PodGroupConfig = Field(
        default_factory=lambda: PodGroupConfig(cpu=16, memory="64Gi", max_replicas=16), description="CPU workers for Ray Data."
    )
    gpu_workers: PodGroupConfig = Field(
        default_factory=lambda: PodGroupConfig(cpu=32, memory="256Gi", gpu=4, max_replicas=4),
        description="GPU workers for training, captioning, embedding and serving.",
    )
    idle_timeout_s: int = Field(600, ge=0, description="Seconds an idle worker pod lives before the autoscaler removes it.")
    ray_token_secret: str = Field(
        "restoray-ray-token", pattern=K8S_NAME, description="Secret with key auth_token: Ray's token auth (spec.authOptions)."
    )
    credentials_secret: str = Field(
        "restoray-credentials",
        pattern=K8S_NAME,
        description="Secret loaded as environment into every Ray pod: MLFLOW_TRACKING_USERNAME/PASSWORD, "
        "AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY.",
    )
    serve_tokens_secret: str = Field(
        "restoray-serve-tokens",
        pattern=K8S_NAME,
        description="Secret with key tokens: the Serve API's bearer tokens (RESTORAY_SERVE_TOKENS).",
    )
    data_input: str | None = Field(None, description="The data build RayJob's --input (a corpus on s3://).")
    data_output: str | None = Field(None, description="The data build RayJob's --output; unset: train.data.")
    index_input: str | None = Field(None, description="The index build RayJob's --input; unset: the data build's output.")
    index_output: str | None = Field(None, description="The index build RayJob's --output (the reference index on s3://).")
    model: str | None = Field(
        None,
        description="What the restore-batch and eval RayJobs load (--weights: models:/NAME/VERSION, @ALIAS, s3://); unset: serve.weights.",
    )
    restore_input: str | None = Field(None, description="The restore-batch RayJob's --input (images on s3://).")
    restore_output: str | None = Field(None, description="The restore-batch RayJob's --output (s3://).")
    eval_protocol: str = Field("realesrgan-x4", description="The eval RayJob's --protocol (`restoray list protocols`).")
    eval_data: str | None = Field(None, description="The eval RayJob's --data (HQ images, or LQ/ and HQ/, on s3://).")
    eval_output: str | None = Field(None, description="The eval RayJob's --output (s3://).")
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLFLOW_TRACKING_URI of every Ray pod; unset: the in-cluster server of infra/mlflow/ "
        "(http://mlflow.NAMESPACE.svc.cluster.local:5000). Each environment sets the variable; configs leave mlflow.tracking_uri unset.",
    )
    job_cluster: Literal["shared", "own"] = Field(
        "shared",
        description="shared: RayJobs run on the RayCluster (clusterSelector); own: each RayJob brings a cluster of the same "
        "spec, deleted ttl_s after the job finishes.",
    )
    job_deadline_s: int = Field(7 * 86400, gt=0, description="activeDeadlineSeconds of every RayJob: KubeRay stops a job running longer.")
    job_ttl_s: int = Field(
        600, ge=0, description="job_cluster = own: seconds the finished job's cluster is kept (ttlSecondsAfterFinished)."
    )
    termination_grace_s: int = Field(
        120,
        ge=60,
        description="terminationGracePeriodSeconds of every Ray pod: room for its preStop `ray stop` and for Serve's graceful "
        "shutdown (20 s per replica) and proxy draining (30 s).",
    )
    gcs_redis_address: str = Field(
        "redis://restoray-redis:6379",
        description="The RayService's external Redis (GCS fault tolerance: Serve keeps answering while the head restarts).",
    )
    gcs_redis_secret: str = Field(
        "restoray-redis", pattern=K8S_NAME, description="Secret with key password: the external Redis's password."
    )
    serve_small: PodGroupConfig = Field(
        default_factory=lambda: PodGroupConfig(cpu=2, memory="8Gi", min_replicas=1, max_replicas=4),
        description="The RayService's small CPU group: the Ingress, Captioner and Retriever deployments run there, not on a "
        "whole CPU worker.",
    )


class RunConfig(StrictModel):
    """A whole run: what `configs/*.toml` holds."""

    seed: int = Field(0, description="Seed of the run; recorded with its outputs.")
    preset: str = Field("tiny", description="Model preset naming every network (`restoray list presets`).")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray connection.")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="MLflow tracking.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Caches and S3 access.")
    samples: SamplesConfig = Field(default_factory=SamplesConfig, description="The bundled sample corpus.")
    data: DataBuildConfig = Field(default_factory=DataBuildConfig, description="`restoray data build`.")
    index: IndexConfig = Field(default_factory=IndexConfig, description="`restoray index build`: the reference index.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training.")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Restoration-guided EDM sampler.")
    restore: RestoreConfig = Field(default_factory=RestoreConfig, description="Restore defaults.")
    restore_batch: RestoreBatchConfig = Field(default_factory=RestoreBatchConfig, description="`restoray restore-batch`.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="`restoray eval`: protocols and metrics.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="`restoray serve`: the Ray Serve application.")
    infra: InfraConfig = Field(default_factory=InfraConfig, description="`restoray infra render`: KubeRay manifests.")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, model: type[StrictModel] = RunConfig) -> StrictModel:
    """Load a TOML run (default: the packaged local.toml), apply `--set` overrides, validate. Raises `ConfigError`."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (pass --config with a TOML run file, e.g. one from configs/)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    _check_keys(model, data, source=str(path))
    for override in overrides or []:
        apply_override(model, data, override)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, model, source=f"{path} with --set overrides" if overrides else str(path))) from None


def apply_override(model: type[BaseModel], data: dict, override: str) -> None:
    """Write one `a.b=value` into `data`, checking the key path against `model` first.

    The value is read as a TOML literal (`3`, `1.5`, `true`, `[1, 2]`, `"text"`); a bare word stays text. A
    string-typed field always takes the text as written, so `--set preset=123` is the string "123".
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set ray.num_cpus=2")
    parts = key.split(".")
    target_model: type[BaseModel] = model
    node = data
    for depth, part in enumerate(parts):
        fields = target_model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(_unknown_key_message(".".join(parts[: depth + 1]), part, list(fields), where, "--set"))
        annotation = fields[part].annotation
        sub_model = _sub_model(annotation)
        if depth < len(parts) - 1:
            if sub_model is None:
                raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])!r} is a value, not a section")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])!r} is not a table in the config file")
            target_model = sub_model
        else:
            if sub_model is not None:
                raise ConfigError(f"--set {key}: {key!r} is a section; set one of its keys: {', '.join(sub_model.model_fields)}")
            node[part] = _parse_value(raw.strip(), annotation)


def _parse_value(raw: str, annotation: Any) -> Any:
    if _accepts_text(annotation) and not raw.startswith('"'):
        return raw
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def _accepts_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts_text(arg) for arg in typing.get_args(annotation))
    return False


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _check_keys(model: type[BaseModel], data: dict, source: str, prefix: str = "") -> None:
    """Report the first unknown key with its nearest valid neighbours (pydantic only says 'extra')."""
    for key, value in data.items():
        if key not in model.model_fields:
            raise ConfigError(
                _unknown_key_message(prefix + key, key, list(model.model_fields), prefix.rstrip(".") or "the top level", source)
            )
        sub_model = _sub_model(model.model_fields[key].annotation)
        if sub_model is not None and isinstance(value, dict):
            _check_keys(sub_model, value, source, prefix=f"{prefix}{key}.")


def _unknown_key_message(full_key: str, key: str, valid: list[str], where: str, source: str) -> str:
    nearest = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(n) for n in nearest)}?" if nearest else ""
    return f"{source}: unknown key {full_key!r}{hint} Valid keys in {where}: {', '.join(valid)}"


def _describe(err: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"{source}: invalid config"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"])
        description = _field_description(model, item["loc"])
        got = f" (got {item['input']!r})" if item["type"] != "missing" else ""
        lines.append(f"  {key}: {item['msg']}{got}" + (f" -- {description}" if description else ""))
    return "\n".join(lines)


def _field_description(model: type[BaseModel], loc: tuple) -> str | None:
    current: type[BaseModel] | None = model
    field = None
    for part in loc:
        if current is None or part not in current.model_fields:
            return None
        field = current.model_fields[part]
        current = _sub_model(field.annotation)
    return field.description if field is not None else None


def describe_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every settable key as (dotted key, type, description), for `--help` texts and docs."""
    rows = []
    for name, field in model.model_fields.items():
        sub_model = _sub_model(field.annotation)
        if sub_model is not None:
            rows.extend(describe_keys(sub_model, prefix=f"{prefix}{name}."))
        else:
            annotation = field.annotation
            type_name = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
            rows.append((prefix + name, type_name, field.description or ""))
    return rows
