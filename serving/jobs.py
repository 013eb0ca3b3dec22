"""Jobs (POST /v1/jobs), their whole lifecycle in one place.

State lives in the `JobBoard`, one async Ray actor per Serve application (named `restoray-jobs-<app>`, detached,
restarted by Ray when it dies). The board writes every state change to `serve.jobs_dir` (shared storage on a
cluster) and reads it back when it restarts; results are files there too, written by the ingress that ran the job,
never held in actor memory; both are removed `serve.job_ttl_s` after the job was created.

    queued -> captioning -> retrieving -> restoring -> done | failed | cancelled

A job runs as a task on one ingress replica, which renews the job's lease (`JobRunner`); a job whose lease lapses
(its replica died) is marked failed with that reason, never left running. The Restorer replica sends progress in
batches every `serve.progress_every_s` (`ProgressReporter`), and learns in the same reply which of its jobs were
cancelled or are over, so their samplers stop at the next step. A job belongs to the token that created it: to any
other token it does not exist (404). The board also counts requests per token per minute for `[serve.limits]
requests_per_minute`, across every ingress replica.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from runtime.config import StorageConfig
from serving.config import ServeConfig

log = logging.getLogger(__name__)
STATES = ("queued", "captioning", "retrieving", "restoring", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
SERVE_NAMESPACE = "serve"


def board_name(app_name: str) -> str:
    return f"restoray-jobs-{app_name}"


def jobs_root(config: ServeConfig, app_name: str) -> str:
    """serve.jobs_dir/<app>, or a directory under this node's temp dir when unset (one machine only)."""
    base = config.jobs_dir or str(Path(tempfile.gettempdir()) / "restoray-jobs")
    return f"{base.rstrip('/')}/{app_name}"


def job_board(app_name: str, config: ServeConfig, storage: StorageConfig):
    """The application's board: created by the first replica that asks, found by the others."""
    import ray

    return (
        ray.remote(JobBoard)
        .options(
            name=board_name(app_name),
            namespace=SERVE_NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_restarts=-1,  # a dead board comes back and reads its jobs from jobs_dir
            max_task_retries=-1,  # and calls made meanwhile are retried on it
            max_concurrency=1000,  # event streams wait on it
        )
        .remote(jobs_root(config, app_name), config.model_dump(mode="json"), storage.model_dump(mode="json"))
    )


def stop_board(app_name: str) -> bool:
    """Kill an application's board (`restoray serve` on its way out); its files stay until they expire."""
    import ray

    try:
        ray.kill(ray.get_actor(board_name(app_name), namespace=SERVE_NAMESPACE), no_restart=True)
    except ValueError:
        return False
    return True


class JobStore:
    """Job records and results as files under one root (local or s3://): state/<id>.json, results/<id>.bin and
    results/<id>.json. Blocking: the board calls it from threads."""

    def __init__(self, root: str, storage: StorageConfig):
        from runtime.storage import filesystem

        self.fs, self.root = filesystem(root, storage)
        self.fs.makedirs(f"{self.root}/state", exist_ok=True)
        self.fs.makedirs(f"{self.root}/results", exist_ok=True)

    def save(self, job: dict[str, Any]) -> None:
        path = f"{self.root}/state/{job['id']}.json"
        with self.fs.open(path + ".tmp", "w") as out:
            json.dump(job, out)
        self.fs.mv(path + ".tmp", path)  # a reader (a restarting board) never sees half a record

    def load_all(self) -> list[dict[str, Any]]:
        jobs = []
        for path in self.fs.glob(f"{self.root}/state/*.json"):
            try:
                with self.fs.open(path) as source:
                    jobs.append(json.load(source))
            except (OSError, json.JSONDecodeError) as err:
                log.warning("job record %s unreadable, skipped: %s", path, err)
        return jobs

    def write_result(self, job_id: str, data: bytes, meta: dict[str, Any]) -> None:
        with self.fs.open(f"{self.root}/results/{job_id}.bin", "wb") as out:
            out.write(data)
        with self.fs.open(f"{self.root}/results/{job_id}.json", "w") as out:
            json.dump(meta, out)

    def read_result(self, job_id: str) -> tuple[bytes, dict[str, Any]] | None:
        try:
            with self.fs.open(f"{self.root}/results/{job_id}.json") as source:
                meta = json.load(source)
            with self.fs.open(f"{self.root}/results/{job_id}.bin", "rb") as source:
                return source.read(), meta
        except FileNotFoundError:
            return None

    def remove(self, job_id: str) -> None:
        for path in (f"state/{job_id}.json", f"results/{job_id}.bin", f"results/{job_id}.json"):
            try:
                self.fs.rm(f"{self.root}/{path}")
            except FileNotFoundError:
                pass


class JobBoard:
    """The job table of one application (an async Ray actor; see the module docstring)."""

    def __init__(self, root: str, serve_config: dict, storage: dict):
        self.application = root.rstrip("/").rsplit("/", 1)[-1]  # jobs_root ends with the application's name
        self.config = ServeConfig.model_validate(serve_config)
        self.store = JobStore(root, StorageConfig.model_validate(storage))
        self.jobs: dict[str, dict[str, Any]] = {}
        now = time.time()
        for job in self.store.load_all():
            if job["state"] not in FINISHED:
                job["lease_until"] = now + self.config.job_lease_s  # its runner gets one lease to renew it
            self.jobs[job["id"]] = job
        self.changed: dict[str, asyncio.Event] = {}
        self.requests: dict[str, collections.deque] = {}
        self._sweeper: asyncio.Task | None = None
        self._lock = threading.Lock()
        if self.jobs:
            log.info("job board: %d jobs read back from %s", len(self.jobs), root)

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _start_sweeping(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        import ray

        gauge = None
        if ray.is_initialized():  # as an actor (a unit test drives the class without Ray)
            from serving.metrics import BoardMetrics

            gauge = BoardMetrics(self.application)
        while True:
            await asyncio.sleep(min(1.0, self.config.job_lease_s / 4))
            try:
                await self.sweep()
                if gauge is not None:
                    gauge.job_counts(await self.counts())
            except Exception:  # a failed sweep is retried at the next tick; the board stays up
                log.exception("job board sweep failed")

    async def _save(self, job: dict[str, Any]) -> None:
        job["version"] = job.get("version", 0) + 1
        self._notify(job["id"])
        await asyncio.to_thread(self.store.save, dict(job))

    def _notify(self, job_id: str) -> None:
        event = self.changed.pop(job_id, None)
        if event is not None:
            event.set()

    def _mine(self, job_id: str, owner: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        return job if job is not None and job["owner"] == owner else None

    @staticmethod
    def _public(job: dict[str, Any]) -> dict[str, Any]:
        return {key: job[key] for key in ("id", "state", "step", "total", "created", "updated", "expires", "error", "version")}

    # ---- the ingress's calls ----------------------------------------------------------------------------------
    async def admit(self, owner: str, per_minute: int) -> float:
        """0 when `owner` may make another request now, else the seconds until it may (its last minute is full)."""
        self._start_sweeping()
        now = time.monotonic()
        recent = self.requests.setdefault(owner, collections.deque())
        while recent and recent[0] <= now - 60:
            recent.popleft()
        if len(recent) >= per_minute:
            return max(0.1, recent[0] + 60 - now)
        recent.append(now)
        return 0.0

    async def create(self, job_id: str, owner: str, total: int) -> dict[str, Any] | None:
        """A new queued job; None when serve.max_pending_jobs jobs are unfinished (the caller answers 503)."""
        self._start_sweeping()
        if sum(job["state"] not in FINISHED for job in self.jobs.values()) >= self.config.max_pending_jobs:
            return None
        now = time.time()
        job = {
            "id": job_id,
            "owner": owner,
            "state": "queued",
            "step": 0,
            "total": total,
            "created": now,
            "updated": now,
            "expires": now + self.config.job_ttl_s,
            "lease_until": now + self.config.job_lease_s,
            "error": None,
        }
        self.jobs[job_id] = job
        await self._save(job)
        return self._public(job)

    async def renew(self, job_ids: list[str]) -> None:
        """The runners' heartbeat: these jobs' ingress is alive."""
        until = time.time() + self.config.job_lease_s
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is not None and job["state"] not in FINISHED:
                job["lease_until"] = until

    async def set_state(self, job_id: str, state: str) -> bool:
        """Move a job on; False when it is over (cancelled, failed by its lease): the caller stops."""
        job = self.jobs.get(job_id)
        if job is None or job["state"] in FINISHED:
            return False
        job.update(state=state, updated=time.time())
        await self._save(job)
        return True

    async def finish(self, job_id: str, meta: dict[str, Any]) -> None:
        """The result is stored (the runner wrote it): the job is done."""
        job = self.jobs.get(job_id)
        if job is not None and job["state"] not in FINISHED:
            job.update(state="done", step=job["total"], updated=time.time(), result=meta)
            await self._save(job)
        await self._trim()

    async def fail(self, job_id: str, status: int, message: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job["state"] not in FINISHED:
            job.update(state="failed", error={"status": status, "message": message}, updated=time.time())
            await self._save(job)
        await self._trim()

    async def cancel(self, job_id: str, owner: str) -> dict[str, Any] | None:
        job = self._mine(job_id, owner)
        if job is None:
            return None
        if job["state"] not in FINISHED:
            job.update(state="cancelled", updated=time.time())
            await self._save(job)
        return self._public(job)

    async def state(self, job_id: str, owner: str) -> dict[str, Any] | None:
        job = self._mine(job_id, owner)
        return self._public(job) if job is not None else None

    async def result_meta(self, job_id: str, owner: str) -> dict[str, Any] | None:
        job = self._mine(job_id, owner)
        return None if job is None else job.get("result")

    async def wait(self, job_id: str, owner: str, after_version: int, timeout_s: float) -> dict[str, Any] | None:
        """The job once its version passes `after_version` (or as it is after `timeout_s`); None: no such job."""
        job = self._mine(job_id, owner)
        if job is None:
            return None
        if job.get("version", 0) <= after_version and job["state"] not in FINISHED:
            event = self.changed.setdefault(job_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except TimeoutError:
                pass
        job = self._mine(job_id, owner)
        return self._public(job) if job is not None else None

    # ---- the Restorer's calls ---------------------------------------------------------------------------------
    async def report(self, progress: dict[str, tuple[int, int]], watching: list[str] = ()) -> list[str]:
        """Steps done, batched: {job id: (step, total)}, and the replica's jobs with no step yet. Returns the jobs
        among both that are over (cancelled, failed, expired): their samplers stop."""
        over = [job_id for job_id in watching if self.jobs.get(job_id, {}).get("state", "cancelled") in FINISHED]
        now = time.time()
        for job_id, (step, total) in progress.items():
            job = self.jobs.get(job_id)
            if job is None or job["state"] in FINISHED:
                over.append(job_id)
                continue
            job.update(state="restoring", step=step, total=total, updated=now)
            job["version"] = job.get("version", 0) + 1  # progress is not written to storage: a restart resumes at a state change
            self._notify(job_id)
        return over

    # ---- housekeeping -----------------------------------------------------------------------------------------
    async def sweep(self) -> dict[str, int]:
        """Fail the jobs whose lease lapsed, remove the expired ones (and their results)."""
        now = time.time()
        failed = expired = 0
        for job in list(self.jobs.values()):
            if job["expires"] <= now:
                self.jobs.pop(job["id"], None)
                self._notify(job["id"])
                await asyncio.to_thread(self.store.remove, job["id"])
                expired += 1
            elif job["state"] not in FINISHED and job["lease_until"] <= now:
                lapsed = now - job["lease_until"] + self.config.job_lease_s
                message = f"the ingress replica running it stopped (no heartbeat for {lapsed:.0f} s)"
                job.update(state="failed", error={"status": 500, "message": message}, updated=now)
                await self._save(job)
                failed += 1
        return {"failed": failed, "expired": expired}

    async def counts(self) -> dict[str, int]:
        """Jobs by state (the application's job gauge)."""
        return dict(collections.Counter(job["state"] for job in self.jobs.values()))

    async def _trim(self) -> None:
        finished = sorted((job for job in self.jobs.values() if job["state"] in FINISHED), key=lambda job: job["updated"])
        for job in finished[: max(0, len(finished) - self.config.jobs_kept)]:
            self.jobs.pop(job["id"], None)
            await asyncio.to_thread(self.store.remove, job["id"])


class JobRunner:
    """The ingress side: runs jobs as tasks of this replica and renews their leases while they run."""

    def __init__(self, board, store: JobStore, lease_s: float):
        self.board, self.store, self.lease_s = board, store, lease_s
        self.tasks: dict[str, asyncio.Task] = {}
        self._heartbeat: asyncio.Task | None = None

    def start(self, job_id: str, work) -> None:
        """Run the coroutine `work` as job `job_id`; it must end by calling `done`, `failed` (or be cancelled)."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks[job_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(job_id, None))
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while self.tasks:
            try:
                await self.board.renew.remote(list(self.tasks))
            except Exception:  # the board is restarting: the next beat reaches it (its restart grants a lease)
                log.warning("job lease renewal failed; retrying", exc_info=True)
            await asyncio.sleep(self.lease_s / 3)

    async def done(self, job_id: str, data: bytes, meta: dict[str, Any]) -> None:
        await asyncio.to_thread(self.store.write_result, job_id, data, meta)
        await self.board.finish.remote(job_id, meta)

    async def failed(self, job_id: str, status: int, message: str) -> None:
        await self.board.fail.remote(job_id, status, message)


class ProgressReporter:
    """The Restorer side: sampler steps (recorded from the model thread) go to the board in one call every
    `every_s`; the reply names the jobs that are over, whose cancel flags are then set."""

    def __init__(self, board, every_s: float):
        self.board, self.every_s = board, every_s
        self.pending: dict[str, tuple[int, int]] = {}
        self.flags: dict[str, threading.Event] = {}
        self.steps_run: collections.OrderedDict[str, int] = collections.OrderedDict()  # the last 256 jobs' steps
        self._lock = threading.Lock()
        self._task: asyncio.Task | None = None

    def follow(self, job_id: str, flag: threading.Event) -> None:
        with self._lock:
            self.flags[job_id] = flag
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._send_forever())

    def step(self, job_id: str, step: int, total: int) -> None:
        """From the model thread: a step of `job_id` ran."""
        with self._lock:
            self.pending[job_id] = (step, total)
            self.steps_run[job_id] = step
            self.steps_run.move_to_end(job_id)
            while len(self.steps_run) > 256:
                self.steps_run.popitem(last=False)

    def unfollow(self, job_id: str) -> None:
        with self._lock:
            self.flags.pop(job_id, None)

    async def _send_forever(self) -> None:
        while self.flags or self.pending:
            await asyncio.sleep(self.every_s)
            with self._lock:
                progress, self.pending = self.pending, {}
                # Jobs still queued in this replica (no step yet) are asked about too: a cancel stops them early.
                watching = [job_id for job_id in self.flags if job_id not in progress]
            try:
                over = await self.board.report.remote(progress, watching)
            except Exception:  # the board is restarting: the next report carries the latest steps
                log.warning("progress report to the job board failed; the next one carries it", exc_info=True)
                continue
            with self._lock:
                for job_id in over:
                    flag = self.flags.get(job_id)
                    if flag is not None:
                        flag.set()
