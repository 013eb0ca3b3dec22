import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from restoration.restorer import Restorer
from tests.conftest import subprocess_env


@pytest.fixture(scope="module")
def photo():
    import skimage.data

    return Image.fromarray(skimage.data.chelsea()).resize((72, 48))


@pytest.fixture(scope="module")
def restorer():
    return Restorer.from_pretrained("tiny")


def test_restore_is_deterministic_per_seed_and_keeps_the_size(restorer, photo):
    first = restorer.restore(photo, prompt="a cat", steps=3, seed=0)
    assert first.size == photo.size and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(restorer.restore(photo, prompt="a cat", steps=3, seed=0)))
    assert not np.array_equal(np.asarray(first), np.asarray(restorer.restore(photo, prompt="a cat", steps=3, seed=1)))
    captioned = restorer.restore(photo, prompt=None, steps=2, seed=0)  # the tiny VLM captions the stage-1 image
    assert captioned.size == photo.size


def test_save_and_load_round_trip_exactly(restorer, photo, tmp_path):
    import torch

    with torch.no_grad():
        for block in restorer.model.connectors:
            for connector in block:
                connector.gamma.weight.normal_(0, 0.01)  # "trained" weights, so the round trip means something
    restorer.save_pretrained(tmp_path / "weights")
    loaded = Restorer.from_pretrained(tmp_path / "weights")
    expected = restorer.restore(photo, prompt="a cat", steps=3, seed=0)
    assert np.array_equal(np.asarray(loaded.restore(photo, prompt="a cat", steps=3, seed=0)), np.asarray(expected))
    state, reloaded = restorer.trained_state(), loaded.trained_state()
    assert state.keys() == reloaded.keys() and all(torch.equal(state[k], reloaded[k]) for k in state)


def test_references_change_the_result_and_gate_zero_does_not(restorer, photo):
    reference = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    plain = np.asarray(restorer.restore(photo, prompt="a cat", steps=3, seed=0))
    gated_off = np.asarray(restorer.restore(photo, prompt="a cat", steps=3, seed=0, references=(reference,), gate_scale=0.0))
    assert np.abs(gated_off.astype(int) - plain.astype(int)).max() <= 1
    assert restorer.networks.unet.attn_processors  # processors restored after the call


def test_restore_cli_end_to_end(tmp_path):
    import skimage.data

    source = tmp_path / "coffee.png"
    Image.fromarray(skimage.data.coffee()).resize((96, 64)).save(source)
    output = tmp_path / "restored.png"
    command = [sys.executable, "-m", "restoray", "restore", str(source), "--output", str(output), "--preset", "tiny", "--steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(output).size == (96, 64)
    bad = subprocess.run(
        [*command[:4], str(tmp_path / "nope.png"), *command[5:]], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path
    )
    assert bad.returncode == 2 and "nope.png" in bad.stderr
    bad_experts = subprocess.run([*command, "--experts", "noise=lots"], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path)
    assert bad_experts.returncode == 2 and "--experts" in bad_experts.stderr


def test_expert_weights_parse_modes_and_oracle_weights():
    from restoray.restore import parse_expert_weights

    assert parse_expert_weights("one_hot") == "one_hot"
    assert parse_expert_weights("noise=0.7, blur=0.3") == {"noise": 0.7, "blur": 0.3}


def test_references_apply_only_inside_their_range(restorer, photo):
    reference = photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    plain = np.asarray(restorer.restore(photo, prompt="a cat", steps=3, seed=0))
    never = np.asarray(restorer.restore(photo, prompt="a cat", steps=3, seed=0, references=(reference,), reference_range=(0.2, 0.4)))
    assert np.abs(never.astype(int) - plain.astype(int)).max() <= 1  # no step (progress 0, 0.5, 1) in range: the plain result
    late = np.asarray(restorer.restore(photo, prompt="a cat", steps=3, seed=0, references=(reference,), reference_range=(0.5, 1.0)))
    always = np.asarray(restorer.restore(photo, prompt="a cat", steps=3, seed=0, references=(reference,)))
    assert not np.array_equal(always, plain) and not np.array_equal(late, always)
    with pytest.raises(Exception, match="reference_range"):
        restorer.restore(photo, prompt="a cat", steps=1, references=(reference,), reference_range=(0.8, 0.2))


def test_large_latents_are_denoised_in_tiles(restorer, photo):
    wide = photo.resize((144, 48))  # an 18x6 latent on the tiny VAE; tiles of 8 with overlap 4 cover it
    tiled_once = np.asarray(restorer.restore(wide, prompt="a cat", steps=2, seed=0, tile_latent=8, tile_overlap=4))
    assert tiled_once.shape == (48, 144, 3)
    assert np.array_equal(tiled_once, np.asarray(restorer.restore(wide, prompt="a cat", steps=2, seed=0, tile_latent=8, tile_overlap=4)))
    untiled = np.asarray(restorer.restore(wide, prompt="a cat", steps=2, seed=0, tile_latent=None))
    assert not np.array_equal(tiled_once, untiled)  # the tiles really ran (the UNet sees less context per tile)


def test_experts_are_blended_by_the_estimator_and_saved_with_it(photo, tmp_path):
    import torch

    from restoration.errors import InputError
    from restoration.models.estimator import DegradationEstimator

    restorer = Restorer("tiny", experts={"names": ["noise", "blur"], "rank": 4})
    restorer.set_estimator(DegradationEstimator([1, 2], width=8))
    with torch.no_grad():
        for block in restorer.model.connectors:
            for connector in block:
                connector.gamma.weight.normal_(0, 0.05)  # trained connectors, or the adaptor (and experts) are invisible
        for name, parameter in restorer.model.adaptor.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
        restorer.estimator.head.bias.copy_(torch.tensor([5.0, -5.0]))  # the estimator is sure it sees noise

    def run(weights):
        return np.asarray(restorer.restore(photo, prompt="a cat", steps=2, seed=0, expert_weights=weights))

    noise, blur = run({"noise": 1.0}), run({"blur": 1.0})
    assert not np.array_equal(noise, blur)
    assert np.array_equal(run("one_hot"), noise)  # the estimator's arg-max picks the noise expert
    soft_weights = restorer.expert_weights_for(restorer._prepare(photo), "soft")
    assert soft_weights["noise"] > 0.99 and abs(sum(soft_weights.values()) - 1) < 1e-6
    with pytest.raises(InputError, match="unknown experts"):
        run({"rain": 1.0})
    with pytest.raises(InputError, match="unknown degradation types"):
        restorer.add_experts(["smudge"])

    restorer.save_pretrained(tmp_path / "abair")
    loaded = Restorer.from_pretrained(tmp_path / "abair")
    assert loaded.experts == {"names": ["noise", "blur"], "rank": 4} and loaded.estimator.type_ids == [1, 2]
    assert np.array_equal(np.asarray(loaded.restore(photo, prompt="a cat", steps=2, seed=0, expert_weights="one_hot")), noise)
    without = Restorer("tiny", experts={"names": ["noise"]})
    with pytest.raises(InputError, match="needs a degradation estimator"):
        without.restore(photo, prompt="a cat", steps=1)
