"""Jobs (POST /v1/jobs): their state lives in one named, detached Ray actor, the `JobBoard`, so that every ingress
replica sees every job; the Restorer replica running a job reports each sampler step to it and reads the job's cancel
flag in the same call, so a cancelled job stops at its next step."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

BOARD_NAME = "restoray-jobs"
STATES = ("queued", "captioning", "retrieving", "restoring", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")


class JobBoard:
    """In-memory job table (a Ray actor); keeps at most `kept` finished jobs, oldest dropped first."""

    def __init__(self, kept: int = 256):
        self.kept = kept
        self.jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.results: dict[str, dict[str, Any]] = {}

    def create(self, job_id: str, total: int) -> None:
        now = time.time()
        self.jobs[job_id] = {"id": job_id, "state": "queued", "step": 0, "total": total, "created": now, "updated": now, "error": None}
        self._trim()

    def set_state(self, job_id: str, state: str) -> bool:
        """Move a job on; returns False when it was cancelled (the caller then stops)."""
        job = self.jobs.get(job_id)
        if job is None or job["state"] == "cancelled":
            return False
        job.update(state=state, updated=time.time())
        return True

    def progress(self, job_id: str, step: int, total: int) -> bool:
        """A sampler step done; returns True when the job is cancelled (the sampler stops at this step)."""
        job = self.jobs.get(job_id)
        if job is None:
            return True
        if job["state"] != "cancelled":
            job.update(state="restoring", step=step, total=total, updated=time.time())
        return job["state"] == "cancelled"

    def finish(self, job_id: str, result: dict[str, Any]) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job["state"] != "cancelled":
            job.update(state="done", step=job["total"], updated=time.time())
            self.results[job_id] = result
        self._trim()

    def fail(self, job_id: str, status: int, message: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job["state"] != "cancelled":
            job.update(state="failed", error={"status": status, "message": message}, updated=time.time())
        self._trim()

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        if job is not None and job["state"] not in FINISHED:
            job.update(state="cancelled", updated=time.time())
        return dict(job) if job is not None else None

    def state(self, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        return dict(job) if job is not None else None

    def result(self, job_id: str) -> dict[str, Any] | None:
        return self.results.get(job_id)

    def _trim(self) -> None:
        finished = [job_id for job_id, job in self.jobs.items() if job["state"] in FINISHED]
        for job_id in finished[: max(0, len(finished) - self.kept)]:
            self.jobs.pop(job_id, None)
            self.results.pop(job_id, None)
