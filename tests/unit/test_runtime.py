"""The storage module's rules (which errors are the storage's, retries with backoff), fault injection, tracking URI."""

from __future__ import annotations

import errno

import pytest

from restoration.errors import InputError
from runtime import faults
from runtime.config import MlflowConfig, StorageConfig, tracking_uri
from runtime.storage import StorageError, is_storage_error, retrying, storage_cause

FAST = StorageConfig(attempts=3, backoff_s=0.0)


class Flaky:
    def __init__(self, failures: int, error: Exception):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "bytes"


def test_errors_of_the_source_and_of_the_storage_are_told_apart():
    assert not is_storage_error(FileNotFoundError("gone"), "s3://bucket/key")
    assert is_storage_error(PermissionError("403 Forbidden"), "s3://bucket/key")
    assert is_storage_error(ConnectionResetError("reset"), "s3://bucket/key")
    assert is_storage_error(RuntimeError("botocore EndpointConnectionError"), "s3://bucket/key")
    assert not is_storage_error(PermissionError(errno.EACCES, "denied"), "/data/photo.png")  # one local file
    assert is_storage_error(OSError(errno.EIO, "I/O error"), "/mnt/nfs/photo.png")  # the device
    assert is_storage_error(OSError(errno.ESTALE, "stale handle"), "/mnt/nfs/photo.png")


def test_storage_errors_are_retried_then_stop_and_source_errors_pass_at_once():
    flaky = Flaky(2, PermissionError("403"))
    assert retrying(flaky, "s3://bucket/key", FAST) == "bytes" and flaky.calls == 3
    persistent = Flaky(10, TimeoutError("read timeout"))
    with pytest.raises(StorageError, match=r"s3://bucket/key after 3 attempt\(s\): TimeoutError") as caught:
        retrying(persistent, "s3://bucket/key", FAST)
    assert persistent.calls == 3 and caught.value.exit_code == 1
    missing = Flaky(10, FileNotFoundError("no such key"))
    with pytest.raises(FileNotFoundError):
        retrying(missing, "s3://bucket/key", FAST)
    assert missing.calls == 1


def test_storage_error_survives_pickling_and_is_found_inside_wrappers():
    import pickle

    error = StorageError("s3://bucket/key", PermissionError("403"), 5)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.uri == "s3://bucket/key"
    try:
        try:
            raise error
        except StorageError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as outer:
        assert storage_cause(outer) is error
    assert storage_cause(RuntimeError("unrelated")) is None


def test_faults_come_from_one_variable_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.delenv(faults.VARIABLE, raising=False)
    assert faults.active() == {} and faults.fault("index.fail_after_rows") == 0
    monkeypatch.setenv(faults.VARIABLE, "index.fail_after_rows=3, build.fail_after_rows=2")
    assert faults.active() == {"index.fail_after_rows": 3, "build.fail_after_rows": 2}
    monkeypatch.setenv(faults.VARIABLE, "build.fail_after_rwos=3")
    with pytest.raises(InputError, match="fail_after_rwos"):
        faults.active()


def test_tracking_uri_config_wins_then_environment_then_sqlite(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(MlflowConfig()) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(MlflowConfig()) == "http://127.0.0.1:5000"
    assert tracking_uri(MlflowConfig(tracking_uri="sqlite:///other.db")) == "sqlite:///other.db"


def test_shipped_default_config_honours_mlflow_tracking_uri(monkeypatch):
    from restoray.config import load_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(load_config().mlflow) == "http://127.0.0.1:5999"
    assert tracking_uri(load_config(overrides=["mlflow.tracking_uri=sqlite:///set.db"]).mlflow) == "sqlite:///set.db"


def test_private_memory_peak_counts_allocations_not_mapped_file_pages(tmp_path):
    import numpy as np

    from runtime.memory import PrivateMemoryPeak, private_bytes

    before = private_bytes()
    assert before is not None and before > 0  # Linux: RssAnon
    path = tmp_path / "vectors.npy"
    np.save(path, np.ones((64, 2**20 // 8), dtype=np.float64))  # 64 MiB
    with PrivateMemoryPeak() as mapped:
        total = float(np.load(path, mmap_mode="r").sum())  # every page read through a mapping: the page cache's
    assert total == 64 * 2**20 // 8 and mapped.bytes < before + 32 * 2**20
    with PrivateMemoryPeak() as allocated:
        held = np.ones(2**27 // 8)  # 128 MiB, touched (held to the end: the last sample sees it however fast it was)
    assert allocated.bytes >= before + 100 * 2**20
    del held


def test_a_resource_wait_stops_a_main_thread_blocked_on_a_lock(monkeypatch):
    """The watcher must wake a job whose main thread sits in a blocking wait (Ray Data's iterator on a queue): a
    flag-only interrupt would be seen only when the wait ends on its own (here after 30 s; in the suite's flake, at
    pytest's 600 s timeout)."""
    import threading
    import time

    import ray

    from runtime import resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(resources, "POLL_S", 0.1)
    saved = resources.policy()
    resources.set_policy(resources.ResourcePolicy(autoscaling=True, resource_wait_s=0.5))
    try:
        started = time.monotonic()
        with pytest.raises(resources.ResourceWaitError, match=r"lacks 2 CPU"), resources.awaiting_resources({"CPU": 4.0}, "the pool"):
            threading.Event().wait(30)
        assert time.monotonic() - started < 10

        # An interrupt that lands in a finaliser is dropped by Python: here the body drops the first one itself. The
        # watcher interrupts again until the body has ended.
        monkeypatch.setattr(resources, "INTERRUPT_EVERY_S", 0.5)
        dropped = []
        started = time.monotonic()
        with pytest.raises(resources.ResourceWaitError), resources.awaiting_resources({"CPU": 4.0}, "the pool"):
            while time.monotonic() - started < 30:
                try:
                    time.sleep(0.01)
                except KeyboardInterrupt:
                    if dropped:
                        raise
                    dropped.append(time.monotonic())
        assert time.monotonic() - started < 10

        # A library that replaced the SIGINT handler (here: ignored) does not keep the job waiting either.
        import signal

        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            started = time.monotonic()
            with pytest.raises(resources.ResourceWaitError), resources.awaiting_resources({"CPU": 4.0}, "the pool"):
                while time.monotonic() - started < 30:
                    time.sleep(0.01)
            assert time.monotonic() - started < 10
        finally:
            signal.signal(signal.SIGINT, previous)

        # A handler set below Python (a native library's own sigaction, which Python's signal module does not see):
        # in the suite the blocking wait above then ran its full 30 s. The wait installs Python's handler for the body.
        import ctypes

        libc = ctypes.CDLL(None)
        libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
        libc.signal(signal.SIGINT, 1)  # SIG_IGN, behind Python's back
        try:
            started = time.monotonic()
            with pytest.raises(resources.ResourceWaitError), resources.awaiting_resources({"CPU": 4.0}, "the pool"):
                threading.Event().wait(30)
            assert time.monotonic() - started < 10
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    finally:
        resources.set_policy(saved)
