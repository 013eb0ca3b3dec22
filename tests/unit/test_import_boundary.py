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
leaked = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "deepspeed", "mlflow", "s3fs", "restoray", "pipelines", "training"})
print("MODULES", len(modules))
print("LEAKED", leaked)
"""


def test_restoration_never_imports_orchestration_layers():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "LEAKED []" in result.stdout, result.stdout
    count = int(result.stdout.split("MODULES ")[1].split()[0])
    assert count >= 4
