"""`restoray submit`: run a restoray command as a Ray job through the Ray Jobs API.

The job's working_dir is this project (uploaded by Ray, less the excludes below), its entrypoint is
`python -m restoray ARGS`, its logs are streamed here, and the exit code is the job's status: 0 succeeded,
1 failed or stopped. Cluster nodes must have the project's dependencies installed (`ray_cluster.yaml` does it).

Only non-secret environment variables travel by default (job env vars are visible in the dashboard); pass
secrets explicitly with `--env` or, better, give the nodes an IAM role.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from restoration.errors import InputError, RestorayError
from restoray import OUR_PACKAGES

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HUB_OFFLINE", "HF_ENDPOINT")
FORWARDED_PREFIXES = ("RESTORAY_",)
# Never uploaded: environments, local data and run outputs. Ray refuses working_dirs over 500 MiB.
WORKING_DIR_EXCLUDES = [
    ".venv/",
    ".git/",
    "data/",
    "mlruns/",
    "mlartifacts/",
    "mlflow.db",
    "*.egg-info/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
]


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def job_environment(extra: dict[str, str]) -> dict[str, str]:
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    env.update({key: value for key, value in os.environ.items() if key.startswith(FORWARDED_PREFIXES)})
    env.update(extra)
    return env


def _enable_token_auth_if_available() -> None:
    """`ray start` clusters require token auth; use it whenever a token is configured and the mode is unset."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as err:
        raise InputError(f"{address} refused the authentication token: {err}\n{_TOKEN_FIX}") from err
    except ConnectionError as err:
        raise InputError(
            f"cannot reach the Ray Jobs API at {address} ({err}); start the cluster (`ray up ray_cluster.yaml` or "
            "`ray start --head`) or pass the dashboard URL with --address / RAY_ADDRESS"
        ) from err
    except RuntimeError as err:
        if "auth" in str(err).lower() or "401" in str(err):
            raise InputError(f"{address}: {err}\n{_TOKEN_FIX}") from err
        raise


_TOKEN_FIX = (
    "fix: copy the cluster's token (`ray get-auth-token` on the head node, or its ~/.ray/auth_token) and set "
    "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it"
)


def code_runtime_env() -> dict:
    """What carries our code to the job: the checkout as working_dir (configs/ and the tree with it), or, from an
    installed wheel, our packages as py_modules (never site-packages as a working_dir)."""
    import importlib

    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return {"working_dir": str(checkout), "excludes": WORKING_DIR_EXCLUDES}
    return {"py_modules": [str(Path(importlib.import_module(name).__file__).parent) for name in OUR_PACKAGES]}


AGENT_NOT_READY = "No available agent to submit job"


def _submit_job(client, entrypoint: str, runtime_env: dict, patience_s: float = 60.0) -> str:
    """Submit; a head that has just started answers 500 "No available agent" until its job agent is up: retried
    for `patience_s` (a cluster still starting is not a failed job)."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as err:
            if AGENT_NOT_READY not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def submit(command: list[str], address: str | None = None, env: dict[str, str] | None = None, wait: bool = True) -> int:
    from ray.job_submission import JobStatus

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if not address.startswith(("http://", "https://")):
        raise InputError(f"--address {address!r}: the Jobs API needs the dashboard URL, e.g. http://head:8265")
    _enable_token_auth_if_available()
    client = _client(address)
    entrypoint = "python -m restoray " + shlex.join(command)
    runtime_env = {**code_runtime_env(), "env_vars": job_environment(env or {})}
    job_id = _submit_job(client, entrypoint, runtime_env)
    print(f"submitted job {job_id} to {address}: {entrypoint}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0
    try:
        asyncio.run(_stream_logs(client, job_id))
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"stopped job {job_id}", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {info.status}" + (f" ({info.message})" if info.message else ""), file=sys.stderr)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    if info.status in (JobStatus.FAILED, JobStatus.STOPPED):
        return 1
    raise RestorayError(f"job {job_id} ended its log stream in state {info.status}")


async def _stream_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)
