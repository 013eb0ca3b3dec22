"""Resolve the URIs users pass (local paths, `s3://`, `models:/name/version`, Hugging Face ids) to what
`restoration/` accepts: a local path, or a Hugging Face id it loads itself.

Remote objects are copied into the local cache (`storage.cache_dir`) first; an S3 object already cached with the
same ETag is not downloaded again; a registered model version (immutable) is downloaded once, an alias every time.
Every failure names the URI and the likely fix; resolving happens before work starts, so failures are bad input.
"""

from __future__ import annotations

import logging
import os
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
        return str(_download_s3(uri, storage))
    if uri.startswith("models:/"):
        return str(_download_model(uri, storage, mlflow or MlflowConfig()))
    if "://" in uri:
        raise InputError(f"unsupported URI scheme in {uri!r}; use a local path, s3://, models:/ or a Hugging Face id")
    path = Path(uri).expanduser()
    if path.exists():
        return str(path)
    if _looks_like_hub_id(uri):
        return uri
    raise InputError(f"{uri!r} is neither an existing path nor a Hugging Face id (org/name)")


def _looks_like_hub_id(uri: str) -> bool:
    parts = uri.split("/")
    return len(parts) == 2 and all(parts) and not uri.startswith((".", "~"))


def cache_root(storage: StorageConfig) -> Path:
    return Path(storage.cache_dir).expanduser()


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
