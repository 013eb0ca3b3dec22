import os
import time

import pytest

import runtime.resolve
from restoration.errors import InputError
from runtime.config import MlflowConfig, StorageConfig
from runtime.resolve import pin, resolve
from tests.conftest import free_port


def test_local_paths_and_hub_ids(tmp_path):
    storage = StorageConfig(cache_dir=str(tmp_path / "cache"))
    (tmp_path / "weights").mkdir()
    assert resolve(str(tmp_path / "weights"), storage) == str(tmp_path / "weights")
    assert resolve("stabilityai/stable-diffusion-xl-base-1.0", storage) == "stabilityai/stable-diffusion-xl-base-1.0"
    with pytest.raises(InputError, match="neither an existing path nor a Hugging Face id"):
        resolve(str(tmp_path / "missing" / "deeper"), storage)
    with pytest.raises(InputError, match="unsupported URI scheme"):
        resolve("gs://bucket/key", storage)


def test_s3_objects_and_prefixes_resolve_to_the_cache(tmp_path, moto_endpoint, aws_test_credentials):
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="weights")
    s3.put_object(Bucket="weights", Key="adaptor/config.json", Body=b'{"a": 1}')
    s3.put_object(Bucket="weights", Key="adaptor/model.safetensors", Body=b"x" * 1000)
    storage = StorageConfig(cache_dir=str(tmp_path / "cache"), s3_endpoint_url=moto_endpoint)

    local = resolve("s3://weights/adaptor", storage)
    assert sorted(p.name for p in (tmp_path / "cache" / "s3" / "weights" / "adaptor").iterdir()) == ["config.json", "model.safetensors"]
    assert local.endswith("weights/adaptor")
    single = resolve("s3://weights/adaptor/config.json", storage)
    assert open(single, "rb").read() == b'{"a": 1}'

    # A changed object is fetched again; an unchanged one is served from the cache.
    s3.put_object(Bucket="weights", Key="adaptor/config.json", Body=b'{"a": 22}')
    assert open(resolve("s3://weights/adaptor/config.json", storage), "rb").read() == b'{"a": 22}'

    with pytest.raises(InputError, match="s3://weights/nothing-here does not exist"):
        resolve("s3://weights/nothing-here", storage)
    with pytest.raises(InputError, match="s3://no-such-bucket/x"):
        resolve("s3://no-such-bucket/x", storage)


def test_unreachable_s3_endpoint_fails_fast_naming_the_uri(tmp_path, aws_test_credentials):
    storage = StorageConfig(cache_dir=str(tmp_path), s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(InputError, match="s3://bucket/key"):
        resolve("s3://bucket/key", storage)
    assert time.monotonic() - started < 60


def test_models_uri_downloads_the_registered_version(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment("uris")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text('{"stage": "adaptor"}')
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(weights), artifact_path="weights")
    client = mlflow.MlflowClient(tracking)
    client.create_registered_model("restoray-test")
    client.create_model_version("restoray-test", source=f"{run.info.artifact_uri}/weights", run_id=run.info.run_id)

    storage, mlflow_config = StorageConfig(cache_dir=str(tmp_path / "cache")), MlflowConfig(tracking_uri=tracking)
    local = resolve("models:/restoray-test/1", storage, mlflow_config)
    found = list((tmp_path / "cache").rglob("config.json"))
    assert found and found[0].read_text() == '{"stage": "adaptor"}'
    assert str(found[0]).startswith(local)
    with pytest.raises(InputError, match="models:/restoray-test/9"):
        resolve("models:/restoray-test/9", storage, mlflow_config)
    with pytest.raises(InputError, match="expected models:/NAME/VERSION"):
        resolve("models:/justaname", storage, mlflow_config)

    # What a job's driver hands its actors: the alias pinned to the version it names now, checked to exist.
    client.create_model_version("restoray-test", source=f"{run.info.artifact_uri}/weights", run_id=run.info.run_id)
    client.set_registered_model_alias("restoray-test", "champion", "2")
    assert pin("models:/restoray-test@champion", storage, mlflow_config) == "models:/restoray-test/2"
    assert pin("models:/restoray-test/1", storage, mlflow_config) == "models:/restoray-test/1"
    with pytest.raises(InputError, match="models:/restoray-test/9"):
        pin("models:/restoray-test/9", storage, mlflow_config)
    with pytest.raises(InputError, match="restoray-test@nobody"):
        pin("models:/restoray-test@nobody", storage, mlflow_config)
    assert pin(str(weights), storage) == str(weights)
    assert pin("tiny-org/tiny-model", storage) == "tiny-org/tiny-model"  # a Hugging Face id stays as it is
    with pytest.raises(InputError, match="neither an existing path"):
        pin("./no/such/weights", storage)


def test_concurrent_resolvers_on_one_node_download_once(tmp_path, moto_endpoint, aws_test_credentials):
    """The actors of a pool resolve the same URI at once on one node: one downloads, the others wait for its copy."""
    from concurrent.futures import ThreadPoolExecutor

    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint})
    fs.mkdir("lockbucket")
    fs.pipe("lockbucket/weights/model.safetensors", b"x" * 2_000_000)
    storage = StorageConfig(cache_dir=str(tmp_path / "cache-$RESTORAY_TEST_NODE"), s3_endpoint_url=moto_endpoint)
    downloads = []  # each finished download is moved into place from its partial file
    original = os.replace

    def counting_replace(source, target):
        downloads.append(str(target))
        return original(source, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RESTORAY_TEST_NODE", "node-a")  # cache_dir's $VARS are expanded where it is used
        patch.setattr(runtime.resolve.os, "replace", counting_replace)
        with ThreadPoolExecutor(4) as pool:
            paths = list(pool.map(lambda _: resolve("s3://lockbucket/weights", storage), range(4)))
    assert len(set(paths)) == 1 and paths[0].startswith(str(tmp_path / "cache-node-a"))
    assert len(downloads) == 1, downloads
