"""`restoray demo` end to end on the embedded default, as `make demo` runs it."""

import subprocess
import sys

from tests.conftest import subprocess_env


def test_demo_runs_on_the_embedded_default(tmp_path):
    env = subprocess_env()
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-m", "restoray", "demo", "--set", "ray.num_cpus=1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # The embedded local Ray instance, bound to loopback.
    assert "Ray: embedded local instance (1 CPUs, node 127.0.0.1)" in out
    # The sample corpus, materialised relative to the working directory as configs/local.toml says.
    samples = tmp_path / "data" / "samples"
    assert len(list(samples.glob("*.png"))) == len(list(samples.glob("*.txt"))) >= 10
    assert "sdxl" in out and "tiny" in out
    for network in ("unet", "vae", "text_encoder_2", "captioner", "clip_scorer"):
        assert f"      {network}" in out
