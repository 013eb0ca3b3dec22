import subprocess
import sys

import pytest

from restoration.errors import ConfigError
from restoray.config import RunConfig, describe_keys, load_config
from tests.conftest import REPO_ROOT, subprocess_env


def test_local_toml_is_the_embedded_default():
    config = load_config()
    assert isinstance(config, RunConfig)
    assert config.preset == "tiny"
    assert config.ray.address is None
    assert config.train.resolution == 256
    assert config.mlflow.tracking_uri is None  # MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (runtime.config.tracking_uri)


def test_every_shipped_config_validates():
    for path in sorted((REPO_ROOT / "configs").glob("*.toml")):
        assert isinstance(load_config(path), RunConfig), path


def test_overrides_are_typed():
    config = load_config(overrides=["ray.num_cpus=3", "seed=7", "preset=123", "mlflow.experiment=exp one", "train.resolution=512"])
    assert config.ray.num_cpus == 3
    assert config.seed == 7
    assert config.preset == "123"  # a string field takes the text as written
    assert config.mlflow.experiment == "exp one"
    assert config.train.resolution == 512


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("ray.num_cpus=abc", "ray.num_cpus: Input should be a valid integer"),
        ("ray.num_cpus=0", "ray.num_cpus: Input should be greater than or equal to 1"),
        ("train.resolution=300", "train.resolution: Input should be a multiple of 64"),
        ("seed=1.5", "seed: Input should be a valid integer"),
    ],
)
def test_wrong_type_names_key_and_expectation(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert expected in str(err.value)
    assert err.value.exit_code == 2


@pytest.mark.parametrize(
    ("override", "key", "nearest"),
    [
        ("ray.adress=x", "'ray.adress'", "'address'"),
        ("trian.resolution=256", "'trian'", "'train'"),
        ("train.resolutoin=256", "'train.resolutoin'", "'resolution'"),
    ],
)
def test_unknown_override_key_suggests_nearest(override, key, nearest):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    message = str(err.value)
    assert f"unknown key {key}" in message
    assert f"did you mean {nearest}" in message


def test_override_syntax_and_sections():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["ray.num_cpus"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(overrides=["ray=3"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(overrides=["seed.x=3"])


def test_bad_toml_files(tmp_path):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[mlflow]\ntracking_url = "x"\n')
    with pytest.raises(ConfigError) as err:
        load_config(unknown)
    assert "unknown key 'mlflow.tracking_url'" in str(err.value) and "'tracking_uri'" in str(err.value)

    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text('[train]\nresolution = "256"\n')
    with pytest.raises(ConfigError) as err:
        load_config(wrong_type)
    assert "train.resolution: Input should be a valid integer" in str(err.value)

    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nresolution = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)

    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_every_key_is_documented():
    rows = describe_keys()
    assert ("train.resolution", "int") == rows[[r[0] for r in rows].index("train.resolution")][:2]
    assert all(description for _, _, description in rows)


def test_cli_exits_2_naming_the_key(tmp_path):
    bad_set = subprocess.run(
        [sys.executable, "-m", "restoray", "demo", "--set", "ray.num_cpu=2"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    assert bad_set.returncode == 2
    assert "ray.num_cpu" in bad_set.stderr and "num_cpus" in bad_set.stderr

    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[ray]\nnum_cpus = 'two'\n")
    result = subprocess.run(
        [sys.executable, "-m", "restoray", "demo", "--config", str(bad_toml)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "ray.num_cpus" in result.stderr
    # It failed before any work: no sample corpus was written.
    assert not (tmp_path / "data").exists()
