"""The wheel is a complete restoray: built from a copy of the tree, installed alone into a target directory, run from
outside the repository with that target first on the path (the venv behind it still provides torch and the rest)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

from PIL import Image

from tests.conftest import REPO_ROOT, subprocess_env

RUNTIME_FILES = (
    "restoray/defaults/local.toml",
    "restoray/samples.toml",
    "restoration/models/preset_files/tiny.toml",
    "restoration/models/preset_files/sdxl.toml",
    "restoration/models/preset_files/supir-v0.toml",
    "restoration/sampling/presets/supir-paper.toml",
    "restoration/sampling/presets/supir-release.toml",
    *(f"restoration/models/base_configs/sdxl_{name}.json" for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")),
    "restoration/models/base_configs/llava_1.5_7b.json",
    "restoration/models/base_configs/llava_1.5_13b.json",
    "restoration/planning/gpus.toml",
    *(
        f"restoration/evaluation/protocols/{name}.toml"
        for name in (
            "realesrgan-x4",
            "spire-parameterized",
            "abair-5task",
            "abair-heldout",
            "abair-benchmarks",
            "realsr-x4",
            "drealsr-x4",
            "paired",
            "no-reference",
        )
    ),
    "serving/ui/index.html",
    "serving/ui/app.js",
    "serving/ui/style.css",
    "serving/config.yaml",
    "restoray/templates/image.toml",
    *(f"restoray/templates/kuberay/{name}.yaml.j2" for name in ("_cluster", "configmap", "raycluster", "rayjob", "rayservice")),
)
PACKAGES = ("restoray", "restoration", "pipelines", "training", "runtime", "serving")


def test_wheel_installs_alone_and_runs_from_an_empty_directory(tmp_path):
    source = tmp_path / "source"
    # A copy: `pip wheel` writes build/ and *.egg-info into the tree it builds.
    ignored = shutil.ignore_patterns(
        ".git", ".venv", "data", "build", "dist", "*.egg-info", "__pycache__", "mlflow.db", "mlruns", ".ruff_cache"
    )
    shutil.copytree(REPO_ROOT, source, ignore=ignored)
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(wheels.glob("restoray-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert all(name in names for name in RUNTIME_FILES), sorted(n for n in names if not n.endswith(".py"))
    assert all(f"{package}/__init__.py" in names for package in PACKAGES)

    target = tmp_path / "target"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = subprocess_env(PYTHONPATH=str(target))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=empty, env=env, timeout=600)

    where = run(
        "-c", "import json, restoray, restoration, runtime; print(json.dumps([restoray.__file__, restoration.__file__, runtime.__file__]))"
    )
    assert where.returncode == 0, where.stderr
    assert all(path.startswith(str(target)) for path in json.loads(where.stdout)), where.stdout  # not the repository's
    presets = run("-m", "restoray", "list", "presets")
    assert presets.returncode == 0 and "tiny" in presets.stdout and "sdxl" in presets.stdout, presets.stderr
    # `restoray plan`'s GPU table and the configs it sizes the sdxl preset from (SDXL's UNet, LLaVA-1.5 13B), offline.
    planning = run(
        "-c",
        "from restoration.models.presets import load_preset; from restoration.planning.configs import network_config; "
        "from restoration.planning.plan import gpu_table; preset = load_preset('sdxl'); print(len(gpu_table()[1]), "
        "network_config(preset.unet, 'unet')['sample_size'], network_config(preset.captioner, 'vlm')['text_config']['hidden_size'])",
    )
    assert planning.returncode == 0 and planning.stdout.split() == ["8", "128", "5120"], planning.stderr[-2000:]
    protocols = run("-m", "restoray", "list", "protocols")
    assert protocols.returncode == 0 and "abair-heldout" in protocols.stdout and "no-reference" in protocols.stdout, protocols.stderr
    config = run("-m", "restoray", "list", "config")
    assert config.returncode == 0 and "sampler.steps" in config.stdout and "restore.gate_scale" in config.stdout, config.stderr
    Image.new("RGB", (64, 48), (90, 120, 150)).save(empty / "photo.png")
    restored = run(
        "-m", "restoray", "restore", "photo.png", "--output", "out.png", "--preset", "tiny", "--steps", "1", "--prompt", "a wall"
    )
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert Image.open(empty / "out.png").size == (64, 48)
    # The web UI is served from the installed package, and the Serve config is written from it.
    ui = run("-c", "from serving.api import UI_DIR; print(UI_DIR, sorted(p.name for p in UI_DIR.iterdir()))")
    assert ui.returncode == 0 and ui.stdout.startswith(str(target)) and "'app.js', 'index.html', 'style.css'" in ui.stdout, ui.stderr
    written = run("-m", "restoray", "serve", "--write-config", "serve.yaml")
    assert written.returncode == 0 and "import_path: serving.app:app_builder" in (empty / "serve.yaml").read_text(), written.stderr
    # The KubeRay templates and the image tag from the wheel alone (a config with the jobs' paths, written here).
    paths = (
        '[infra]\ndata_input = "s3://b/c"\nindex_output = "s3://b/i"\nmodel = "models:/m/1"\nrestore_input = "s3://b/in"\n'
        'restore_output = "s3://b/out"\neval_data = "s3://b/hq"\neval_output = "s3://b/e"\n[train]\ndata = "s3://b/d"\nstorage_path = "s3://b/t"\n'
    )
    (empty / "run.toml").write_text(paths)
    manifests = run("-m", "restoray", "infra", "render", "--config", "run.toml", "--output", "kuberay")
    assert manifests.returncode == 0, manifests.stderr
    assert "kind: RayCluster" in (empty / "kuberay" / "raycluster.yaml").read_text()
    assert "restoray data build --input s3://b/c --output s3://b/d" in (empty / "kuberay" / "rayjob-data-build.yaml").read_text()
    assert "restoray eval --weights models:/m/1" in (empty / "kuberay" / "rayjob-eval.yaml").read_text()
