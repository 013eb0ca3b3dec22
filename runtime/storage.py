"""Filesystems, storage-error classification and retries: the one storage module every job layer imports.

An error while reading or writing is one of two things, and the difference decides what a job does with it:
- an error of the *source* (the object does not exist, is a directory, its bytes are corrupt): that one input is
  unusable; the dataset build records it as a reject and goes on;
- an error of the *storage* (403 from S3, throttling, timeouts, 5xx, connection refused or reset, a failing mount):
  nothing is wrong with the input. It is retried with backoff (`StorageConfig.attempts`, on top of botocore's own
  retries); if it persists the job stops with `StorageError` (exit 1), naming the URI and the cause, and nothing is
  recorded as a reject, so a resumed job reads it again.

s3fs maps S3's 404/NoSuchKey to FileNotFoundError and 403 to PermissionError; connection failures arrive as
botocore/aiohttp exceptions or OSError. So on `s3://` only "not found"-like errors belong to the source. On a local
path an OSError belongs to the file (permissions, a vanished file), except the errno values of a failing device or
network mount.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

from restoration.errors import InputError, RestorayError
from runtime.config import StorageConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

SOURCE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
# A local OSError with one of these is the device's or the network mount's, not the file's.
LOCAL_STORAGE_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.ENOTCONN, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENOSPC}


class StorageError(RestorayError):
    """The storage failed (not the input) and kept failing after retries: the job stops (exit 1); resume finishes it."""

    def __init__(self, uri: str, cause: BaseException, attempts: int = 1):
        self.uri = uri
        self.cause_text = f"{type(cause).__name__}: {cause}{_service_code(cause)}"
        super().__init__(
            f"storage failure on {uri} after {attempts} attempt(s): {self.cause_text}; nothing was recorded as a reject, rerun to resume"
        )

    def __reduce__(self):  # crosses Ray task boundaries intact
        return (_rebuild_storage_error, (self.uri, self.cause_text, str(self)))


def _service_code(error: BaseException) -> str:
    """' (S3 403 AccessDenied)' when botocore's error is in the chain: s3fs turns it into a PermissionError whose text
    is only the service's message, and which answer it was is what an operator needs."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        response = getattr(error, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
            return f" (S3 {status} {response['Error'].get('Code', '')})".replace("  ", " ")
        error = error.__cause__ or error.__context__
    return ""


def _rebuild_storage_error(uri: str, cause_text: str, message: str) -> StorageError:
    error = StorageError.__new__(StorageError)
    RestorayError.__init__(error, message)
    error.uri, error.cause_text = uri, cause_text
    return error


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def check_shared_storage(on_cluster: bool, paths: dict[str, str | None], storage: StorageConfig, tracking: str | None = None) -> None:
    """The one node-local-path refusal (DESIGN.md, Storage): a job connected to a Ray cluster (not the embedded
    instance) may run its tasks, actors and workers on any node, now or once the cluster has scaled (a cluster scaled
    to zero has one node alive when the job starts), so every path they touch must be one every node reaches (s3://,
    or a shared mount declared with storage.shared_filesystem), and MLflow a tracking server (or a file store on that
    mount). `paths` maps what the user wrote (`--output`, `train.data`) to its value; None and preset names are left
    out by the caller."""
    if not on_cluster or storage.shared_filesystem:
        return
    local = [f"{name}={value!r}" for name, value in paths.items() if value and not is_remote(value) and not value.startswith("models:/")]
    if tracking is not None and (tracking.startswith(("sqlite:", "file:")) or "://" not in tracking):
        local.append(f"mlflow.tracking_uri={tracking!r}")
    if local:
        raise InputError(
            "connected to a Ray cluster, whose nodes do not see this machine's files, so these must be shared storage "
            "(s3://, or a mount every node sees declared with storage.shared_filesystem=true; MLflow as an http(s) "
            f"tracking server): {', '.join(local)}"
        )


def as_path(value: str | None) -> str | None:
    """`value` when it names a file or folder of this machine, else None: weights and models are also named by
    preset names, Hugging Face ids and remote URIs, which the shared-storage check has nothing to say about."""
    if not value or is_remote(value) or "://" in value or value.startswith("models:/"):
        return None
    return value if value.startswith(("/", ".", "~")) or os.path.exists(value) else None


def s3_endpoint(storage: StorageConfig) -> str | None:
    return storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_options(storage: StorageConfig) -> dict[str, Any]:
    """s3fs keyword arguments: the endpoint and the one set of timeouts and botocore retries of this project."""
    options: dict[str, Any] = {
        "config_kwargs": {
            "connect_timeout": storage.connect_timeout_s,
            "read_timeout": storage.read_timeout_s,
            "retries": {"max_attempts": storage.client_attempts, "mode": "standard"},
        }
    }
    endpoint = s3_endpoint(storage)
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def filesystem(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for a local path or an s3:// URI."""
    if is_remote(uri):
        return fsspec.filesystem("s3", **s3_options(storage)), uri.removeprefix("s3://")
    if "://" in uri:
        raise InputError(f"unsupported URI {uri!r}; use a local path or s3://")
    return fsspec.filesystem("file"), uri


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI of a path a filesystem returned (s3fs drops the protocol)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return f"s3://{path}" if "s3" in protocols else path


def arrow_filesystem(uri: str, storage: StorageConfig):
    """(pyarrow filesystem or None for local, path) over the same s3fs options, for pyarrow datasets and Ray Train."""
    if not is_remote(uri):
        return None, uri
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri, storage)
    return PyFileSystem(FSSpecHandler(fs)), path


def is_storage_error(error: BaseException, uri: str) -> bool:
    """True when `error` (raised reading or writing `uri`) is the storage's fault rather than the object's."""
    if isinstance(error, SOURCE_ERRORS):
        return False
    if is_remote(uri):
        return isinstance(error, Exception)
    return isinstance(error, OSError) and error.errno in LOCAL_STORAGE_ERRNOS


class Backoff:
    """The one retry policy: `failed(error)` after a storage error sleeps the next exponential delay, or raises
    StorageError once `storage.attempts` attempts have failed. For loops that cannot be a single call (a tar streamed
    row by row resumes where it stopped)."""

    def __init__(self, uri: str, storage: StorageConfig, what: str = "read"):
        self.uri, self.storage, self.what = uri, storage, what
        self.attempt, self.delay = 0, storage.backoff_s

    def failed(self, error: BaseException) -> None:
        self.attempt += 1
        if self.attempt >= self.storage.attempts:
            raise StorageError(self.uri, error, self.attempt) from error
        log.warning(
            "%s %s failed (%s: %s); retry %d/%d in %.1fs",
            self.what, self.uri, type(error).__name__, error, self.attempt, self.storage.attempts - 1, self.delay,
        )  # fmt: skip
        time.sleep(self.delay)
        self.delay = min(self.storage.max_backoff_s, self.delay * 2)


def retrying(call: Callable[[], T], uri: str, storage: StorageConfig, what: str = "read") -> T:
    """`call()`, retried with exponential backoff while it raises storage errors; `StorageError` once they persist.
    Errors of the source are raised unchanged at once (they are the caller's to record)."""
    backoff = Backoff(uri, storage, what)
    while True:
        try:
            return call()
        except StorageError:
            raise
        except Exception as error:
            if not is_storage_error(error, uri):
                raise
            backoff.failed(error)


def read_bytes(uri: str, storage: StorageConfig) -> bytes:
    """The object's bytes. Source errors (not found, a directory) raise as they are; storage errors are retried."""
    fs, path = filesystem(uri, storage)

    def read() -> bytes:
        with fs.open(path, "rb") as handle:
            return handle.read()

    return retrying(read, uri, storage)


def find_cause(error: BaseException, kind: type[E]) -> E | None:
    """The `kind` exception inside one raised through Ray (task errors wrap their cause and pose as it), if any:
    the plain instance when there is one (its message is the message, not a remote traceback)."""
    seen: set[int] = set()
    stack, found = [error], None
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if type(current) is kind:
            return current
        if isinstance(current, kind):
            found = found or current
        stack.extend([current.__context__, current.__cause__, getattr(current, "cause", None)])
    return found


def storage_cause(error: BaseException) -> StorageError | None:
    return find_cause(error, StorageError)
