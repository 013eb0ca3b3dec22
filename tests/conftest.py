"""Test-wide settings: one BLAS thread (two shared cores), Ray kept on loopback, no hub access."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Idle Ray workers kept, as restoray's embedded instance keeps them (restoray.ray_env.connect), in every instance and
# cluster the tests start: ended after a second above the CPU count, each pass of a job restarted its workers.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test environment for child processes, with this interpreter's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def wait_for_http(url: str, process: subprocess.Popen, seconds: float, log_path: Path | None = None) -> None:
    """Poll `url` until it answers (any HTTP status); kill the process group and raise if `process` dies or time runs out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                os.killpg(process.pid, signal.SIGKILL)
                detail = log_path.read_text()[-2000:] if log_path is not None and log_path.exists() else ""
                raise RuntimeError(f"{url} did not come up\n{detail}") from None
            time.sleep(0.5)


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """A moto S3 server on 127.0.0.1, in its own process group, stopped at the end."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    server = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=log,
        start_new_session=True,
        env=subprocess_env(),
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    yield endpoint
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture
def aws_test_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
MLFLOW_ARTIFACT_BUCKET = "mlflow-artifacts"


def moto_client(endpoint: str):
    """A boto3 S3 client of the moto server with its fake credentials (whatever the environment holds)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")


def s3_keys(endpoint: str, bucket: str) -> list[str]:
    """Every key in a moto bucket."""
    pages = moto_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, moto_endpoint):
    """`mlflow server` on 127.0.0.1 with its own sqlite store and an S3 artifact destination (a moto bucket), as
    infra/mlflow/ runs it: the server proxies artifacts, so its clients hold no S3 credentials. Its own process group;
    the training and the two-node tests share it (each in its own experiment)."""
    moto_client(moto_endpoint).create_bucket(Bucket=MLFLOW_ARTIFACT_BUCKET)
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{MLFLOW_ARTIFACT_BUCKET}/runs"],
        stdout=log, stderr=log, start_new_session=True, env=subprocess_env(MLFLOW_S3_ENDPOINT_URL=moto_endpoint, **FAKE_AWS),
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(f"{uri}/health", server, 120, root / "server.log")
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


class RayHead:
    """`ray start --head --block` on 127.0.0.1 in a session of its own, every port explicit, token auth on (a
    short temp dir: Ray's socket paths must stay short, so not pytest's deep tmp_path). Ended by its session: Ray
    puts its worker processes in process groups of their own, but all stay in the head's session (and so do the
    worker nodes an autoscaler's fake provider starts)."""

    PORTS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")  # fmt: skip

    def __init__(self, prefix: str, args: tuple[str, ...] = (), env: dict[str, str] | None = None, gcs_port: int | None = None):
        import tempfile
        import uuid

        self.temp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.token_path = self.temp_dir / "auth_token"
        self.token_path.write_text(uuid.uuid4().hex)
        ports: set[int] = {gcs_port} if gcs_port else set()
        while len(ports) < len(self.PORTS):
            ports.add(free_port())
        others = sorted(ports - {gcs_port})
        self.ports = dict(zip(self.PORTS, [gcs_port or others.pop(0), *others], strict=True))
        worker_low = 20000 + (os.getpid() % 120) * 100  # below the ephemeral range (32768+)
        self.env = subprocess_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                                  **(env or {}))  # fmt: skip
        self.env.pop("RAY_ADDRESS", None)
        command = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                   *(f"--{name}={port}" for name, port in self.ports.items()), f"--min-worker-port={worker_low}",
                   f"--max-worker-port={worker_low + 99}", "--disable-usage-stats", f"--temp-dir={self.temp_dir / 'ray'}",
                   *args]  # fmt: skip
        self.log_path = self.temp_dir / "ray-start.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.address = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.gcs = f"127.0.0.1:{self.ports['port']}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without the token): the dashboard is up
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"ray start --head did not come up:\n{self.log_path.read_text()[-3000:]}") from None
                time.sleep(1)

    def session_processes(self) -> list:
        import psutil

        found = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.process.pid:
                    found.append(process)
            except (ProcessLookupError, PermissionError):
                pass
        return found

    def stop(self) -> None:
        import shutil

        import psutil

        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            # A test's own head, its files removed after: nothing to shut down gracefully for (an autoscaling head
            # took 35 s to go on SIGTERM), so it gets a moment and is then killed.
            self.process.wait(timeout=3)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        left = self.session_processes()
        for process in left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_sample_index(tmp_path_factory):
    """The sample corpus and its reference index (`index build --set data.quality.min_short_side=256`), built once
    per session by the first test module that calls the returned function, inside that module's own Ray instance
    (a session fixture cannot hold one: each module starts and stops its own). Returns (base, images, index):
    `base` holds samples/ and index/; modules that add files of their own make a directory under it."""
    built: dict = {}

    def build() -> tuple[Path, list[Path], Path]:
        if not built:
            from restoray.cli import main
            from restoray.samples import materialise

            base = tmp_path_factory.mktemp("sample-index")
            images = materialise(str(base / "samples"))
            index = base / "index"
            arguments = ["index", "build", "--input", str(base / "samples"), "--output", str(index)]
            assert main([*arguments, "--set", "data.quality.min_short_side=256"]) == 0
            built.update(base=base, images=images, index=index)
        return built["base"], built["images"], built["index"]

    return build
