"""`restoray plan`'s measurements against counts done by hand, and the plan of the tiny preset end to end."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from restoration.planning.measure import fake_module, measure, parameter_stats
from tests.conftest import REPO_ROOT, subprocess_env

BF16, FP32 = 2, 4  # bytes per element


def test_flops_of_a_conv_a_linear_and_an_attention_are_twice_their_macs():
    mode = FakeTensorMode()
    conv = fake_module(lambda: nn.Conv2d(3, 8, 3, padding=1), torch.float32, mode)
    batch, height, width = 2, 16, 16
    macs = batch * 8 * height * width * 3 * 3 * 3  # every output pixel of every output channel: 3 x 3 x 3 inputs
    assert measure(lambda: conv(torch.randn(batch, 3, height, width)), [conv], mode).flops == 2 * macs

    linear = fake_module(lambda: nn.Linear(32, 16), torch.float32, mode)
    assert measure(lambda: linear(torch.randn(4, 32)), [linear], mode).flops == 2 * (4 * 32 * 16)

    heads, q_len, k_len, dim = 4, 64, 32, 16

    def attention():
        query = torch.randn(batch, heads, q_len, dim)
        key, value = torch.randn(batch, heads, k_len, dim), torch.randn(batch, heads, k_len, dim)
        return nn.functional.scaled_dot_product_attention(query, key, value)

    # Q K^T and the weighted sum of V: B H Lq Lk D multiply-adds each (CPU SDPA counts 0 without our formula).
    assert measure(attention, [], mode).flops == 2 * (2 * batch * heads * q_len * k_len * dim)


def test_parameter_and_activation_bytes_are_the_sum_of_the_tensors():
    mode = FakeTensorMode()
    net = fake_module(lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)), torch.bfloat16, mode)
    parameters = 64 * 128 + 128 + 128 * 32 + 32
    stats = parameter_stats(net)
    assert (stats.count, stats.bytes) == (parameters, parameters * BF16)

    def forward():
        with torch.no_grad():
            net(torch.randn(8, 64, dtype=torch.bfloat16))

    measured = measure(forward, [net], mode)
    assert measured.by_category["parameters"] == parameters * BF16
    # The peak: the input, the first layer's output and the ReLU's output alive together (the first output is freed
    # once the second layer has run).
    assert measured.activation_bytes == (8 * 64 + 8 * 128 + 8 * 128) * BF16
    assert measured.peak_bytes == parameters * BF16 + measured.activation_bytes


def test_training_memory_drops_gradients_into_buckets_and_counts_per_sample_activations():
    from restoration.planning.plan import largest_batch, training_peak

    gib = 2**30
    training = {
        "resident_bytes": 10 * gib,
        "bucket_bytes": 2 * gib,
        "optimizer_bytes": 4 * gib,
        "steps": {"plain": {"activation_bytes_per_sample": 3 * gib, "activation_bytes_base": 1 * gib, "flops_per_sample": 1}},
    }
    assert training_peak(training, "plain", 2) == (10 + 2 + 4 + 1 + 2 * 3) * gib
    assert largest_batch(training, "plain", 40 * gib) == 7  # 17 GiB fixed, 23 left: 7 samples of 3
    assert largest_batch(training, "plain", 18 * gib) == 0


@pytest.fixture(scope="module")
def tiny_plan():
    result = subprocess.run(
        [sys.executable, "-m", "restoray", "plan", "--preset", "tiny", "--size", "64", "--train-size", "64", "--gpus", "2", "--json"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env(), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plan: one training step at 64" in result.stderr  # progress on stderr, the plan alone on stdout
    return json.loads(result.stdout)


def test_the_tiny_plan_matches_the_networks_the_restorer_builds(tiny_plan):
    from restoration.restorer import Restorer

    restorer = Restorer("tiny")  # real weights, built as restore builds them
    parameters = tiny_plan["parameters"]
    assert parameters["unet"]["count"] == sum(p.numel() for p in restorer.networks.unet.parameters())
    assert parameters["adaptor"]["trainable"] == sum(p.numel() for p in restorer.model.trainable_parameters())
    assert parameters["vae"]["count"] == sum(p.numel() for p in restorer.networks.vae.parameters())
    assert parameters["unet"]["bytes"] == parameters["unet"]["count"] * BF16  # held in the plan's dtype
    phases = {row["phase"]: row for row in tiny_plan["phases"]}
    step, refir = phases["restore 64: one step"], phases["ReFIR 64 paired: one step"]
    assert step["flops"] > 0 and refir["flops"] > step["flops"]  # the reference chain doubles the passes
    assert phases["restore 128 tiled: one step"]["flops"] > step["flops"]
    peaks = tiny_plan["peaks"]["restore 64"]
    assert peaks["none"] >= peaks["model"] >= peaks["all"] > 0  # offloading never raises the peak
    training = tiny_plan["training"]
    assert training["optimizer_bytes"] == 16 * training["trainable_parameters"] // 2  # fp32 master + moments + grads / 2 GPUs
    assert {gpu["gpu"] for gpu in tiny_plan["gpus"]} >= {"H100-SXM", "A100-80G", "A100-40G", "L40S", "A10G", "RTX-4090", "L4"}


def test_gpu_bench_runs_in_cpu_tiny_mode_beside_the_plan(tiny_plan, tmp_path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(tiny_plan))
    result = subprocess.run(
        [sys.executable, "bench/gpu.py", "--tiny", "--plan", str(plan_file), "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env(), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["row"]: row for row in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    for name in ("restore 64: one step", "ReFIR 64 paired: one step", "ReFIR 64 shared: one step", "restore 128 tiled: one step",
                 "train 64 batch 1", "train 64 batch 1 (checkpointing)"):  # fmt: skip
        assert rows[name]["seconds"] > 0 and rows[name]["tflops"] > 0 and rows[name]["plan_peak_gib"] > 0, name
        assert name in result.stdout
    mismatched = subprocess.run(
        [sys.executable, "bench/gpu.py", "--plan", str(plan_file)], capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env()
    )
    assert mismatched.returncode != 0 and "was made for" in mismatched.stderr  # a plan of other sizes is refused


def test_plan_refuses_sizes_the_model_does_not_take():
    from restoray.cli import main

    assert main(["plan", "--preset", "tiny", "--size", "100"]) == 2
    assert main(["plan", "--preset", "no-such-preset"]) == 2
