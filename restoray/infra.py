"""`restoray infra image` and `restoray infra render`: the container image's tags (written once, in the packaged
templates/image.toml) and the KubeRay manifests of a run, rendered from its config and its Serve config with the
packaged Jinja templates (templates/kuberay/).

What is rendered (into --output):
  restoray-config.yaml       a ConfigMap holding the run config, mounted at /etc/restoray in every Ray pod
  raycluster.yaml            the RayCluster: CPU head, a CPU and a GPU worker group, autoscaling, token auth
  rayjob-data-build.yaml     RayJobs submitted to that RayCluster: `restoray data build`, `index build`, `train`
  rayjob-index-build.yaml
  rayjob-train.yaml
  rayservice.yaml            the RayService of the Serve application (its own cluster, same pod groups)

No credential is written into any of them: pods read MLflow's and S3's from the credentials Secret, Ray's token
from the token Secret, the Serve tokens from theirs (README, Running on a cluster).
"""

from __future__ import annotations

import shlex
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
MANIFESTS = (
    "restoray-config.yaml",
    "raycluster.yaml",
    "rayjob-data-build.yaml",
    "rayjob-index-build.yaml",
    "rayjob-train.yaml",
    "rayservice.yaml",
)
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
    """The command of each RayJob; the paths come from [infra] and [train] and must be shared storage (s3://)."""
    infra: InfraConfig = config.infra
    data_output = infra.data_output or config.train.data
    index_input = infra.index_input or data_output
    needed = {
        "infra.data_input": infra.data_input,
        "infra.data_output (or train.data)": data_output,
        "infra.index_output": infra.index_output,
    }
    missing = [name for name, value in needed.items() if not value]
    if missing:
        raise InputError(f"infra render needs {', '.join(missing)} in the config: the RayJobs' paths (s3:// URIs)")
    # A KubeRay cluster has several nodes: the same refusal the jobs make when they start, at render time.
    from restoray.train import shared_storage_paths
    from runtime.storage import check_shared_storage

    paths = {"infra.data_input": infra.data_input, "infra.data_output": data_output, "infra.index_input": index_input}
    check_shared_storage(True, {**paths, "infra.index_output": infra.index_output, **shared_storage_paths(config)}, config.storage)
    return {
        "data-build": _entrypoint("data", "build", "--input", infra.data_input, "--output", data_output, overrides=overrides),
        "index-build": _entrypoint("index", "build", "--input", index_input, "--output", infra.index_output, overrides=overrides),
        "train": _entrypoint("train", overrides=overrides),
    }


def serve_config_text(config: RunConfig) -> str:
    """Serve's config (the one `restoray serve --write-config` writes) for the RayService: the proxy listens on the
    pod's address, where KubeRay's serve Service reaches it."""
    from restoray.serve import app_config
    from serving.app import deploy_config

    in_pod = config.model_copy(update={"serve": config.serve.model_copy(update={"host": "0.0.0.0", "port": 8000})})
    serve = deploy_config(app_config(in_pod))
    return yaml.safe_dump(serve, sort_keys=False)


def render(config: RunConfig, config_path: str | Path, overrides: list[str] | None = None) -> dict[str, str]:
    """File name -> YAML text of every manifest (MANIFESTS), each parsed back once to prove it is YAML."""
    import jinja2

    overrides = list(overrides or [])
    config_path = Path(config_path)
    entrypoints = job_entrypoints(config, overrides)
    current = image()
    infra = config.infra
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES / "kuberay"), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    environment.policies["json.dumps_kwargs"] = {"sort_keys": False}
    env = {"MLFLOW_TRACKING_URI": config.mlflow.tracking_uri} if config.mlflow.tracking_uri else {}
    tags = {variant: current.tag(variant, infra.repository) for variant in VARIANTS}
    context = {
        "infra": infra,
        "version": __version__,
        "image": {"ray_version": current.ray_version, **tags},
        "config_dir": CONFIG_DIR,
        "config_file": CONFIG_FILE,
        "config_map": f"{infra.name}-config",
        "config_text": config_path.read_text(encoding="utf-8"),
        "env": env,
        # name -> (secret, key, optional): the Serve tokens are needed only where the application runs.
        "secret_env": {"RESTORAY_SERVE_TOKENS": (infra.serve_tokens_secret, "tokens", True)},
    }
    templates = {
        "restoray-config.yaml": ("configmap.yaml.j2", {}),
        "raycluster.yaml": ("raycluster.yaml.j2", {}),
        **{
            f"rayjob-{job}.yaml": ("rayjob.yaml.j2", {"job_name": f"{infra.name}-{job}", "entrypoint": command})
            for job, command in entrypoints.items()
        },
        "rayservice.yaml": ("rayservice.yaml.j2", {"serve_config": serve_config_text(config)}),
    }
    header = HEADER.format(config=config_path.as_posix())
    rendered = {}
    for name, (template, extra) in templates.items():
        text = environment.get_template(template).render(**context, **extra)
        documents = [document for document in yaml.safe_load_all(text) if document]
        rendered[name] = header + yaml.dump_all(documents, Dumper=BlockDumper, sort_keys=False, width=120)
    return rendered


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
