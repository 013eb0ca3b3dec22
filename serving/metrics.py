"""The application's own metrics, through `ray.serve.metrics` (which adds the deployment, replica and application
tags) and exported with Ray's metrics as `ray_restoray_*` about every 10 s (Ray's report interval).

    restoray_requests            counter   route, status             every answer of the ingress
    restoray_rejections          counter   reason                    every 4xx/5xx, by why (auth, model, size, ...)
    restoray_batch_size          histogram                           requests per Restorer batch
    restoray_steps_per_second    gauge     model                     sampler steps per second of the last restore
    restoray_restore_seconds     histogram model                     a restore on the model thread
    restoray_jobs                gauge     application, state        jobs on the application's board (set by the board
                                                                     every sweep, through ray.util.metrics: it is no replica)
"""

from __future__ import annotations

REASONS = {
    400: "malformed",
    401: "auth",
    403: "auth",
    404: "not_found",
    409: "not_ready",
    413: "too_large",
    415: "media_type",
    422: "invalid",
    429: "rate_limited",
    499: "cancelled",
    503: "busy",
}


class IngressMetrics:
    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("restoray_requests", "Answers of the ingress, by route and status.", tag_keys=("route", "status"))
        self.rejections = metrics.Counter("restoray_rejections", "Refused requests, by reason.", tag_keys=("reason",))

    def answered(self, route: str, status: int) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        if status >= 400:
            self.rejections.inc(tags={"reason": REASONS.get(status, "error")})


class RestorerMetrics:
    def __init__(self):
        from ray.serve import metrics

        self.batch_size = metrics.Histogram(
            "restoray_batch_size", "Requests per Restorer batch.", boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32]
        )
        self.steps_per_second = metrics.Gauge("restoray_steps_per_second", "Sampler steps per second.", tag_keys=("model",))
        self.restore_seconds = metrics.Histogram(
            "restoray_restore_seconds",
            "A restore on the model thread, by model.",
            boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160],
            tag_keys=("model",),
        )

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def restored(self, model: str, seconds: float, steps_per_second: float) -> None:
        self.restore_seconds.observe(seconds, tags={"model": model})
        self.steps_per_second.set(steps_per_second, tags={"model": model})


class BoardMetrics:
    """The job board's gauge (an actor of its own, not a Serve replica: plain ray.util.metrics, tagged by hand)."""

    def __init__(self, application: str):
        from ray.util import metrics

        self.application = application
        self.jobs = metrics.Gauge("restoray_jobs", "Jobs on the application's board, by state.", tag_keys=("application", "state"))

    def job_counts(self, counts: dict[str, int]) -> None:
        from serving.jobs import STATES

        for state in STATES:
            self.jobs.set(counts.get(state, 0), tags={"application": self.application, "state": state})
