import json
import subprocess
import sys

from tests.conftest import subprocess_env

CHECK = r"""
import importlib, pkgutil, sys
import restoration
modules = [m.name for m in pkgutil.walk_packages(restoration.__path__, "restoration.")]
for name in modules:
    importlib.import_module(name)
# Building and running the networks must not pull them in either.
from restoration.models.base import load_sdxl, encode_prompt
from restoration.models.presets import load_preset
encode_prompt(load_sdxl(load_preset("tiny")), ["a cat"])
layers = {"restoray", "pipelines", "training", "runtime", "serving"}
leaked = sorted({m.split(".")[0] for m in sys.modules} & ({"ray", "deepspeed", "mlflow", "s3fs"} | layers))
print("MODULES", len(modules))
print("LEAKED", leaked)
"""


def test_restoration_never_imports_orchestration_layers():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "LEAKED []" in result.stdout, result.stdout
    count = int(result.stdout.split("MODULES ")[1].split()[0])
    assert count >= 4


RUNTIME_CHECK = r"""
import importlib, pkgutil, sys
import runtime
for module in pkgutil.walk_packages(runtime.__path__, "runtime."):
    importlib.import_module(module.name)
print("LEAKED", sorted({m.split(".")[0] for m in sys.modules} & {"restoray", "pipelines", "training", "serving"}))
"""


def test_runtime_sits_below_the_job_layers():
    result = subprocess.run([sys.executable, "-c", RUNTIME_CHECK], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "LEAKED []" in result.stdout, result.stdout


def _leaked_imports(package: str, forbidden: set[str]) -> list[str]:
    """Import every module of `package` in a fresh interpreter: which of `forbidden` ended up loaded."""
    check = f"import importlib, json, pkgutil, sys, {package}\n"
    check += f"[importlib.import_module(m.name) for m in pkgutil.walk_packages({package}.__path__, '{package}.')]\n"
    check += f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(forbidden)!r}))))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"importing {package} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_training_does_not_import_pipelines():
    assert _leaked_imports("training", {"pipelines", "restoray", "serving"}) == []


def test_serving_sits_over_restoration_and_runtime_only():
    assert _leaked_imports("serving", {"pipelines", "restoray", "training"}) == []
