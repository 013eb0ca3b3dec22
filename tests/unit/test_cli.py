import subprocess
import sys

import pytest

from restoration.errors import InputError
from restoray.cli import build_parser, main
from tests.conftest import subprocess_env


def _help_texts(parser, prefix=()):
    """Every parser reachable from the top, with the argv that reaches it."""
    yield prefix, parser
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from _help_texts(sub, (*prefix, name))


def test_help_at_every_level(capsys):
    paths = [argv for argv, _ in _help_texts(build_parser())]
    assert {("demo",), ("list",), ("list", "presets"), ("list", "degradations"), ("list", "config"), ("submit",)} <= set(paths)
    for argv in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: restoray"), argv


def test_console_script_and_module_answer():
    module = subprocess.run([sys.executable, "-m", "restoray", "--help"], capture_output=True, text=True, env=subprocess_env())
    assert module.returncode == 0 and "submit" in module.stdout and "demo" in module.stdout
    script = subprocess.run(["restoray", "submit", "--help"], capture_output=True, text=True, env=subprocess_env())
    assert script.returncode == 0 and "--address" in script.stdout and "Ray job" in script.stdout


def test_list_presets_prints_every_network(capsys):
    assert main(["list", "presets"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "sdxl" in out
    assert "stabilityai/stable-diffusion-xl-base-1.0 [unet]" in out
    for network in ("unet", "vae", "text_encoder_2", "tokenizer_2", "captioner", "clip_scorer"):
        assert f"    {network} " in out


def test_list_config_prints_keys(capsys):
    assert main(["list", "config"]) == 0
    assert "train.resolution" in capsys.readouterr().out


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert main(["submit"]) == 2
    assert "after --" in capsys.readouterr().err
    assert main(["submit", "--address", "127.0.0.1:8265", "--", "list", "presets"]) == 2
    assert "dashboard URL" in capsys.readouterr().err
    assert main(["submit", "--env", "NOVALUE", "--", "list", "presets"]) == 2


def test_list_degradations_prints_ids(capsys):
    assert main(["list", "degradations"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[1]: int(line.split()[0]) for line in lines[1:]}
    assert rows == {"clean": 0, "noise": 1, "blur": 2, "jpeg": 3, "downsample": 4, "rain": 5, "haze": 6, "low_light": 7}


def test_data_build_bad_config_and_input_exit_2_before_any_work(tmp_path, capsys):
    args = ["data", "build", "--input", str(tmp_path), "--output", str(tmp_path / "out")]
    assert main([*args, "--set", "data.crop.size=abc"]) == 2
    assert "data.crop.size" in capsys.readouterr().err
    assert main([*args, "--set", "data.degrade.kinds={sharpen = 1.0}"]) == 2
    assert "kinds must map" in capsys.readouterr().err
    assert main(["data", "build", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_restore_settings_come_from_the_config_with_the_flags_on_top():
    import argparse

    from restoray.config import load_config
    from restoray.restore import restore_settings

    config = load_config(overrides=["sampler.steps=12", "sampler.s_churn=0", "restore.gate_scale=0.5", "restore.seed=4"])
    flags = argparse.Namespace(steps=None, cfg=None, tau_r=None, seed=None, restoration_prompt=None, experts=None)
    sampler, options = restore_settings(config, flags)
    assert (sampler.steps, sampler.s_churn, options.gate_scale, options.seed) == (12, 0.0, 0.5, 4)
    flags = argparse.Namespace(steps=3, cfg=2.0, tau_r=0.0, seed=9, restoration_prompt="Denoise", experts="noise=1")
    sampler, options = restore_settings(config, flags)
    assert (sampler.steps, sampler.cfg, sampler.tau_r, options.seed) == (3, 2.0, None, 9)
    assert options.restoration_prompt == "Denoise" and options.expert_weights == {"noise": 1.0}
    with pytest.raises(InputError, match="steps"):
        restore_settings(config, argparse.Namespace(steps=0, cfg=None, tau_r=None, seed=None, restoration_prompt=None, experts=None))
