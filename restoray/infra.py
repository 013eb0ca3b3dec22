"""`restoray infra image` and `restoray infra render`: the container image's tags (written once, in the packaged
templates/image.toml) and the KubeRay manifests of a run, rendered from its config and its Serve config with the
packaged Jinja templates (templates/kuberay/).

What is rendered (into --output):
  restoray-config.yaml       a ConfigMap holding the run config, mounted at /etc/restoray in every Ray pod
  raycluster.yaml            the RayCluster: CPU head, a CPU and a GPU worker group, autoscaling (v2), token auth
  rayjob-data-build.yaml     RayJobs: `restoray data build`, `index build`, `train`, `restore-batch`, `eval`, on that
  rayjob-index-build.yaml    RayCluster ([infra] job_cluster = "shared") or each on its own cluster ("own")
  rayjob-train.yaml
  rayjob-restore-batch.yaml
  rayjob-eval.yaml
  rayservice.yaml            the RayService of the Serve application (its own cluster, same pod groups plus a small
                             CPU group for the light deployments; GCS fault tolerance on an external Redis)
`restoray infra job COMMAND` renders one RayJob with a fresh name, to run a job again without editing a manifest.

Every Ray pod follows KubeRay's recommendations: requests = limits, /dev/shm as a memory emptyDir (Ray's object
store), a preStop `ray stop` within terminationGracePeriodSeconds.

No credential is written into any of them: pods read MLflow's and S3's from the credentials Secret, Ray's token
from the token Secret, the Serve tokens from theirs (README, Running on a cluster).
"""

from __future__ import annotations

import re
import secrets
import shlex
import string
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

from restoration.errors import InputError
from restoray import __version__
from restoray.config import InfraConfig, RunConfig

TEMPLATES = Path(__file__).resolve().parent / "templates"
IMAGE_FILE = TEMPLATES / "image.toml"
CONFIG_DIR = "/etc/restoray"
CONFIG_FILE = "run.toml"
VARIANTS = ("cpu", "cuda")
JOBS = ("data-build", "index-build", "train", "restore-batch", "eval")
MANIFESTS = ("restoray-config.yaml", "raycluster.yaml", *(f"rayjob-{job}.yaml" for job in JOBS), "rayservice.yaml")
# KubeRay derives the names of a RayJob's cluster and submitter from its own and refuses a longer one.
MAX_JOB_NAME = 47
POOL_LABEL = "restoray.io/pool"  # the Ray node label of each worker group: its groupName
SMALL_DEPLOYMENTS = ("Ingress", "Captioner", "Retriever")  # on the RayService's serve-small group
SHM_SHARE = 0.3  # of the pod's memory: Ray's default object store share
HEADER = (
    "# Rendered by `restoray infra render --config {config}`; do not edit by hand: change the config (its [infra],\n"
    "# [train], [serve] sections) and render again. Apply with `kubectl apply -f DIR/` (README, Running on a cluster).\n"
)


@dataclass(frozen=True)
class Image:
    """Tags of restoray's container image and of Ray's base images, from templates/image.toml."""

    ray_version: str
    python: str
    base: str
    repository: str

    def base_tag(self, variant: str) -> str:
        return f"{self.base}:{self.ray_version}-{self.python}-{'gpu' if variant == 'cuda' else 'cpu'}"

    def tag(self, variant: str, repository: str | None = None) -> str:
        return f"{repository or self.repository}:{__version__}-{variant}"


def image() -> Image:
    values = tomllib.loads(IMAGE_FILE.read_text(encoding="utf-8"))
    return Image(ray_version=values["ray_version"], python=values["python"], base=values["base"], repository=values["repository"])


def run_infra_image(variant: str, base: bool) -> int:
    if variant not in VARIANTS:
        raise InputError(f"--variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    current = image()
    print(current.base_tag(variant) if base else current.tag(variant))
    return 0


def _entrypoint(*args: str, overrides: list[str]) -> str:
    config = f"{CONFIG_DIR}/{CONFIG_FILE}"
    words = ["restoray", *args, "--config", config, *(item for value in overrides for item in ("--set", value))]
    return shlex.join(words)


def job_entrypoints(config: RunConfig, overrides: list[str]) -> dict[str, str]:
    """The command of each RayJob (JOBS); the paths come from [infra], [train] and [serve] and must be shared storage
    (s3://)."""
    infra: InfraConfig = config.infra
    data_output = infra.data_output or config.train.data
    index_input = infra.index_input or data_output
    model = infra.model or config.serve.weights
    needed = {
        "infra.data_input": infra.data_input,
        "infra.data_output (or train.data)": data_output,
        "infra.index_output": infra.index_output,
        "infra.model (or serve.weights)": model,
        "infra.restore_input": infra.restore_input,
        "infra.restore_output": infra.restore_output,
        "infra.eval_data": infra.eval_data,
        "infra.eval_output": infra.eval_output,
    }
    missing = [name for name, value in needed.items() if not value]
    if missing:
        raise InputError(f"infra render needs {', '.join(missing)} in the config: the RayJobs' paths (s3:// URIs)")
    # The RayJobs run on a cluster: the same refusal the jobs make when they start, at render time.
    from restoray.train import shared_storage_paths
    from runtime.storage import as_path, check_shared_storage

    paths = {"infra.data_input": infra.data_input, "infra.data_output": data_output, "infra.index_input": index_input,
             "infra.index_output": infra.index_output, "infra.model": as_path(model), "infra.restore_input": infra.restore_input,
             "infra.restore_output": infra.restore_output, "infra.eval_data": infra.eval_data,
             "infra.eval_output": infra.eval_output}  # fmt: skip
    check_shared_storage(True, {**paths, **shared_storage_paths(config)}, config.storage)
    restore = ("--input", infra.restore_input, "--output", infra.restore_output, "--weights", model)
    evaluate = ("--weights", model, "--protocol", infra.eval_protocol, "--data", infra.eval_data, "--output", infra.eval_output)
    return {
        "data-build": _entrypoint("data", "build", "--input", infra.data_input, "--output", data_output, overrides=overrides),
        "index-build": _entrypoint("index", "build", "--input", index_input, "--output", infra.index_output, overrides=overrides),
        "train": _entrypoint("train", overrides=overrides),
        "restore-batch": _entrypoint("restore-batch", *restore, overrides=overrides),
        "eval": _entrypoint("eval", *evaluate, overrides=overrides),
    }


def shm_size(memory: str) -> str:
    """/dev/shm's size limit for a pod of `memory` (a Kubernetes quantity): Ray's object store share of it, in Mi."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", memory).groups()
    scale = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    if unit not in scale:
        raise InputError(f"memory {memory!r}: use a Kubernetes quantity such as 16Gi")
    return f"{int(float(number) * scale[unit] * SHM_SHARE / 2**20)}Mi"


def job_name(infra: InfraConfig, job: str, suffix: str = "") -> str:
    name = f"{infra.name}-{job}" + (f"-{suffix}" if suffix else "")
    if len(name) > MAX_JOB_NAME:
        raise InputError(f"RayJob name {name!r} has {len(name)} characters, KubeRay takes {MAX_JOB_NAME}: shorten infra.name")
    return name


def serve_config_text(config: RunConfig) -> str:
    """Serve's config (the one `restoray serve --write-config` writes) for the RayService: the proxy listens on the
    pod's address, where KubeRay's serve Service reaches it."""
    from restoray.serve import app_config
    from serving.app import deploy_config

    in_pod = config.model_copy(update={"serve": config.serve.model_copy(update={"host": "0.0.0.0", "port": 8000})})
    serve = deploy_config(app_config(in_pod))
    for deployment in serve["applications"][0]["deployments"]:
        if deployment["name"] in SMALL_DEPLOYMENTS:
            deployment["ray_actor_options"]["label_selector"] = {POOL_LABEL: "serve-small"}
    return yaml.safe_dump(serve, sort_keys=False)


def _environment():
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES / "kuberay"), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    environment.policies["json.dumps_kwargs"] = {"sort_keys": False}
    environment.filters["shm_size"] = shm_size
    return environment


def _context(config: RunConfig, config_path: Path) -> dict:
    current = image()
    infra = config.infra
    tracking = config.mlflow.tracking_uri or infra.mlflow_tracking_uri or f"http://mlflow.{infra.namespace}.svc.cluster.local:5000"
    tags = {variant: current.tag(variant, infra.repository) for variant in VARIANTS}
    return {
        "infra": infra,
        "version": __version__,
        "image": {"ray_version": current.ray_version, **tags},
        "config_dir": CONFIG_DIR,
        "config_file": CONFIG_FILE,
        "config_map": f"{infra.name}-config",
        "config_text": config_path.read_text(encoding="utf-8"),
        # Every environment sets its own tracking server: a config value would override the variable everywhere.
        "env": {"MLFLOW_TRACKING_URI": tracking},
        # name -> (secret, key, optional): the Serve tokens are needed only where the application runs.
        "secret_env": {"RESTORAY_SERVE_TOKENS": (infra.serve_tokens_secret, "tokens", True)},
        "pool_label": POOL_LABEL,
    }


def _render_one(environment, template: str, context: dict, header: str) -> str:
    text = environment.get_template(template).render(**context)
    documents = [document for document in yaml.safe_load_all(text) if document]
    return header + yaml.dump_all(documents, Dumper=BlockDumper, sort_keys=False, width=120)


def render(config: RunConfig, config_path: str | Path, overrides: list[str] | None = None) -> dict[str, str]:
    """File name -> YAML text of every manifest (MANIFESTS), each parsed back once to prove it is YAML."""
    overrides = list(overrides or [])
    config_path = Path(config_path)
    entrypoints = job_entrypoints(config, overrides)
    environment, context = _environment(), _context(config, config_path)
    templates = {
        "restoray-config.yaml": ("configmap.yaml.j2", {}),
        "raycluster.yaml": ("raycluster.yaml.j2", {}),
        **{
            f"rayjob-{job}.yaml": ("rayjob.yaml.j2", {"job": job, "job_name": job_name(config.infra, job), "entrypoint": command})
            for job, command in entrypoints.items()
        },
        "rayservice.yaml": ("rayservice.yaml.j2", {"serve_config": serve_config_text(config)}),
    }
    header = HEADER.format(config=config_path.as_posix())
    return {name: _render_one(environment, template, {**context, **extra}, header) for name, (template, extra) in templates.items()}


def render_job(config: RunConfig, config_path: str | Path, overrides: list[str], job: str, suffix: str | None = None) -> str:
    """One RayJob of `job` (JOBS) named with a fresh suffix: `kubectl apply` of it starts the job again (a RayJob
    runs once; generateName does not work with apply)."""
    if job not in JOBS:
        raise InputError(f"infra job {job!r}: choose one of {', '.join(JOBS)}")
    suffix = suffix or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
    config_path = Path(config_path)
    extra = {"job": job, "job_name": job_name(config.infra, job, suffix), "entrypoint": job_entrypoints(config, overrides)[job]}
    context = {**_context(config, config_path), **extra}
    return _render_one(_environment(), "rayjob.yaml.j2", context, HEADER.format(config=config_path.as_posix()))


class BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the run config, Serve's config) as literal blocks, readable in a diff."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


BlockDumper.add_representer(str, _represent_str)


def run_infra_render(config: RunConfig, config_path: str | None, overrides: list[str], output: str) -> int:
    from restoray.config import DEFAULT_CONFIG

    path = Path(config_path) if config_path else DEFAULT_CONFIG
    rendered = render(config, path, overrides)
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (folder / name).write_text(text, encoding="utf-8")
        print(f"wrote {folder / name}")
    tag = image().tag("cpu", config.infra.repository)
    print(f"{len(rendered)} manifests for image {tag} (and -cuda); apply: kubectl apply -f {folder}/")
    return 0


def run_infra_job(config: RunConfig, config_path: str | None, overrides: list[str], job: str, output: str | None) -> int:
    from restoray.config import DEFAULT_CONFIG

    text = render_job(config, Path(config_path) if config_path else DEFAULT_CONFIG, overrides, job)
    if output:
        Path(output).write_text(text, encoding="utf-8")
        print(f"wrote {output}; apply: kubectl apply -f {output}")
    else:
        print(text, end="")
    return 0
