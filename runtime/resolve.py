"""Resolve the URIs users pass (local paths, `s3://`, `models:/name/version`, Hugging Face ids) to what
`restoration/` accepts: a local path, or a Hugging Face id it loads itself.

Remote objects are copied into the local cache (`storage.cache_dir`, `$VARS` expanded on each node) first; an S3
object already cached with the same ETag is not downloaded again; a registered model version (immutable) is
downloaded once, an alias every time. A lock file per URI in the cache makes concurrent resolvers on one node (the
actors of a pool) download once. Every failure names the URI and the likely fix: failures are bad input.

The one rule for paths that cross nodes: a job's driver `pin`s a URI (an alias to its version, a local path to its
absolute form, checked to exist) and hands the pinned URI to its actors, never a path of its own cache; each actor
`resolve`s it into its own node's cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from restoration.errors import InputError
from runtime.config import MlflowConfig, StorageConfig, tracking_uri
from runtime.storage import filesystem, s3_endpoint

log = logging.getLogger(__name__)


def is_resolvable_remote(uri: str) -> bool:
    return uri.startswith(("s3://", "models:/"))


def resolve(uri: str, storage: StorageConfig, mlflow: MlflowConfig | None = None) -> str:
    """A local path (as a string) for `uri`; Hugging Face ids (`org/name` not on disk) are returned unchanged."""
    if uri.startswith("s3://"):
        with _cache_lock(storage, uri):
            return str(_download_s3(uri, storage))
    if uri.startswith("models:/"):
        with _cache_lock(storage, uri):
            return str(_download_model(uri, storage, mlflow or MlflowConfig()))
    return _local_or_hub(uri)


def _local_or_hub(uri: str, absolute: bool = False) -> str:
    """An existing local path (made absolute if asked) or a Hugging Face id, as it is; else bad input."""
    if "://" in uri:
        raise InputError(f"unsupported URI scheme in {uri!r}; use a local path, s3://, models:/ or a Hugging Face id")
    path = Path(uri).expanduser()
    if path.exists():
        return str(path.resolve() if absolute else path)
    if _looks_like_hub_id(uri):
        return uri
    raise InputError(f"{uri!r} is neither an existing path nor a Hugging Face id (org/name)")


def on_this_node(uri: str, storage: StorageConfig, mlflow: MlflowConfig | None = None) -> str:
    """What an actor or worker loads from a pinned URI: a remote one (s3://, models:/) resolved into this node's
    cache, anything else (a shared path, a preset name, a Hugging Face id) as it is."""
    return resolve(uri, storage, mlflow) if is_resolvable_remote(uri) else uri


def pin(uri: str, storage: StorageConfig, mlflow: MlflowConfig | None = None) -> str:
    """The URI a job's actors resolve on their own nodes: `models:/NAME@ALIAS` becomes the version the alias names
    now (every actor loads the same model, however the alias moves), a local path its absolute form; each is
    checked to exist here first, so a wrong one is bad input before any actor starts."""
    if uri.startswith("models:/"):
        return _pin_model(uri, mlflow or MlflowConfig())
    if uri.startswith("s3://"):
        fs, key = filesystem(uri, storage)
        try:
            found = fs.exists(key.rstrip("/"))
        except Exception as err:  # botocore raises many unrelated classes for network and credential failures
            raise InputError(f"{uri}: cannot read from S3 ({type(err).__name__}: {err}); check the endpoint and credentials") from err
        if not found:
            raise InputError(f"{uri} does not exist (check the bucket and key, and the endpoint {s3_endpoint(storage) or 'AWS'})")
        return uri
    return _local_or_hub(uri, absolute=True)


def _pin_model(uri: str, mlflow_config: MlflowConfig) -> str:
    found = registered_version(uri, mlflow_config)
    return f"models:/{found.name}/{found.version}"


def registered_version(uri: str, mlflow_config: MlflowConfig):
    """The MLflow ModelVersion that `models:/NAME/VERSION` or `models:/NAME@ALIAS` names now; InputError when the
    URI is malformed or names nothing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name_version = uri.removeprefix("models:/").strip("/")
    name, at, alias = name_version.partition("@")
    if not at and "/" not in name_version:
        raise InputError(f"{uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    client = mlflow.MlflowClient(tracking_uri(mlflow_config))
    try:
        if at:
            return client.get_model_version_by_alias(name, alias)
        name, _, version = name_version.partition("/")
        return client.get_model_version(name, version)
    except MlflowException as err:
        raise InputError(f"{uri}: {err.message} (tracking URI {tracking_uri(mlflow_config)})") from err


def _looks_like_hub_id(uri: str) -> bool:
    parts = uri.split("/")
    return len(parts) == 2 and all(parts) and not uri.startswith((".", "~"))


def cache_root(storage: StorageConfig) -> Path:
    return Path(os.path.expandvars(storage.cache_dir)).expanduser()


@contextmanager
def _cache_lock(storage: StorageConfig, uri: str) -> Iterator[None]:
    """One resolver of `uri` at a time on this node: the others wait, then find the cached copy."""
    from filelock import FileLock

    locks = cache_root(storage) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{hashlib.sha256(uri.encode()).hexdigest()[:32]}.lock")):
        yield


def _download_s3(uri: str, storage: StorageConfig) -> Path:
    fs, key = filesystem(uri, storage)
    fs.invalidate_cache()  # fsspec shares instances and their listings; a resolve must see the bucket as it is now
    key = key.rstrip("/")
    try:
        if not fs.exists(key):
            raise InputError(f"{uri} does not exist (check the bucket and key, and the endpoint {s3_endpoint(storage) or 'AWS'})")
        remote_files = fs.find(key) if fs.isdir(key) else [key]
        target_root = cache_root(storage) / "s3"
        for remote in remote_files:
            local = target_root / remote
            # ETags live beside the cache, not in it: the cached folder is handed to from_pretrained as it is.
            etag_file = cache_root(storage) / "s3-etags" / f"{remote}.etag"
            etag = str(fs.info(remote).get("ETag", ""))
            if etag and local.is_file() and etag_file.is_file() and etag_file.read_text() == etag:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(f".{local.name}.partial-{os.getpid()}")
            fs.get_file(remote, str(partial))
            os.replace(partial, local)
            etag_file.parent.mkdir(parents=True, exist_ok=True)
            etag_file.write_text(etag)
        log.info("resolved %s to %s (%d files)", uri, target_root / key, len(remote_files))
        return target_root / key
    except InputError:
        raise
    except PermissionError as err:
        raise InputError(f"{uri}: access denied ({err}); check AWS credentials") from err
    except FileNotFoundError as err:
        raise InputError(f"{uri}: not found ({err})") from err
    except Exception as err:  # botocore raises many unrelated classes for network and credential failures
        raise InputError(f"{uri}: cannot read from S3 ({type(err).__name__}: {err}); check the endpoint and credentials") from err


def _download_model(uri: str, storage: StorageConfig, mlflow_config: MlflowConfig) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    name_version = uri.removeprefix("models:/").strip("/")
    if "/" not in name_version and "@" not in name_version:
        raise InputError(f"{uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    target = cache_root(storage) / "models" / name_version.replace("@", "/@")
    # A registered version never changes, so its cached copy is reused; an alias may move, so it is fetched anew.
    if "@" not in name_version and target.is_dir() and any(target.iterdir()):
        return _single_child(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        mlflow.set_tracking_uri(tracking_uri(mlflow_config))
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target))
    except MlflowException as err:
        raise InputError(f"{uri}: {err.message} (tracking URI {tracking_uri(mlflow_config)})") from err
    return Path(local)


def _single_child(path: Path) -> Path:
    children = list(path.iterdir())
    return children[0] if len(children) == 1 and children[0].is_dir() else path
