"""The benchmark scripts keep running (no timing is asserted: benchmarks are read by people)."""

import subprocess
import sys

from tests.conftest import REPO_ROOT, subprocess_env


def _run_bench(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_degradation_bench_prints_every_row():
    result = _run_bench("bench/degradations.py", "--seconds", "0.05", "--sizes", "64", "--no-profile")
    for row in ("floor", "realesrgan", "realesrgan (plain)", "parameterized", "composite", "single", "negative"):
        assert row in result.stdout
    assert "1/" in result.stdout


def test_sampling_bench_prints_every_row():
    result = _run_bench("bench/sampling.py", "--steps", "1", "--size", "64", "--repeats", "1")
    for row in ("plain", "restoration-guided", "ReFIR, one reference", "ReFIR / no reference"):
        assert row in result.stdout
