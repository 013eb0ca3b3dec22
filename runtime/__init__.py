"""Services every job layer shares, below `pipelines/`, `training/` and `serving/` (which cannot import `restoray/`):

- `runtime.config`: the `[storage]` and `[mlflow]` sections (one set of S3 timeouts and retries);
- `runtime.storage`: filesystems for local paths and `s3://`, storage-error classification, retries with backoff;
- `runtime.resolve`: URI resolution and caching (`s3://`, `models:/`, Hugging Face ids) for what `restoration/` loads;
- `runtime.resources`: the check that actor pools leave CPUs for the tasks beside them;
- `runtime.faults`: the one test-only fault-injection switch.

`restoration/` stays free of all of it: it takes local paths and Hugging Face ids.
"""
