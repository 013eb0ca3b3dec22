"""The benchmark scripts keep running (no timing is asserted: benchmarks are read by people)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, subprocess_env


def _run_bench(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def test_degradation_bench_prints_every_row():
    result = _run_bench("bench/degradations.py", "--seconds", "0.05", "--sizes", "64", "--no-profile")
    for row in (
        "floor",
        "realesrgan",
        "realesrgan (plain)",
        "realesrgan, USM per source",
        "parameterized",
        "composite",
        "degraded_negative",
    ):
        assert row in result.stdout
    assert "1/" in result.stdout


def test_sampling_bench_prints_every_row():
    result = _run_bench("bench/sampling.py", "--steps", "1", "--size", "64", "--repeats", "1")
    rows = ("plain", "restoration-guided", "ReFIR paired", "ReFIR shared", "ReFIR paired / no reference", "ReFIR shared / no reference")
    for row in rows:
        assert row in result.stdout


@pytest.mark.slow
def test_training_bench_prints_both_comparisons():
    result = _run_bench("bench/training.py", "--resolution", "64", "--batch-size", "1", "--steps", "1", "--warmup", "1")
    for row in ("plain torch (single process)", "Ray Train + DeepSpeed ZeRO-2, 1 worker", "plain DDP", "ZeRO-2 / DDP moment bytes"):
        assert row in result.stdout
    ratio = float(result.stdout.split("ZeRO-2 / DDP moment bytes: ")[1].split("x")[0])
    assert 0.4 < ratio < 0.6  # ZeRO-2 shards Adam's moments over the 2 ranks


def test_index_bench_prints_every_type_and_the_embedding_comparison():
    result = _run_bench(
        "bench/index.py", "--count", "3000", "--dim", "16", "--queries", "20", "--types", "flat,ivf", "--embed-images", "32"
    )
    for row in ("flat ", "ivf ", "auto @ 1 GB", "one process, 1 thread", "Ray Data ReferenceStage", "goal Ray overhead"):
        assert row in result.stdout
