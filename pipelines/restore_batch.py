"""`restoray restore-batch`: restore every image of a corpus (any source `data build` reads; local or s3://) with a
Restorer actor pool on Ray Data, writing OUTPUT/images/<name> (named after the source: its path relative to the
input for folders, `file__row=N` / `tar__key` for parquet and webdataset), OUTPUT/results/*.parquet (source, output,
caption, references used, seed, model, seconds) and OUTPUT/rejects/*.parquet (sources that could not be read or
decoded, or that the Restorer refused: restore_error). Each image file is written before its results row, so a
source in results/ always has its image; a rerun skips sources in results/ or rejects/ (resume) and a finished job
is a no-op. Settings: [restore_batch] (actors, batch_size, num_cpus, num_gpus, output_format), with [sampler] and
[restore] as `restoray restore` takes them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

import pyarrow as pa
import ray

from pipelines.config import DataBuildConfig, RestoreBatchConfig
from pipelines.counts import count_output
from pipelines.known_sources import with_known
from pipelines.listing import check_input, list_sources
from pipelines.outputs import read_json, table_dataset, write_json
from pipelines.reading import plain_job_errors, read_stage, source_rows
from pipelines.resume import finished_sources
from pipelines.rows import batch_of, is_rejected, rows_of
from pipelines.sink import CountingSink, block_rows, commit_table, reject_row
from pipelines.stages.decode import decode_row
from pipelines.timer import start_stage_timer
from restoration.dataset import REJECT_SCHEMA
from restoration.errors import InputError, RestorayError
from restoration.settings import RestoreConfig, SamplerConfig
from runtime import faults
from runtime.config import MlflowConfig, StorageConfig
from runtime.resources import awaiting_resources, check_cpus_left
from runtime.storage import filesystem, is_remote, retrying

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
RESULT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("output", pa.string()),  # relative to the job's output: images/<name>
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
        ("references", pa.string()),  # JSON [{source, similarity}] of the ReFIR references used
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("seconds", pa.string()),  # JSON of Restoration.seconds
    ]
)


@dataclass
class RestoreBatchSummary:
    output: str
    sources_in: int = 0
    restored: int = 0
    restored_now: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    already_complete: bool = False

    def table(self) -> str:
        rate = f", {self.restored_now / self.seconds:.2f} images/s" if self.seconds and self.restored_now else ""
        lines = [
            f"restore-batch: {self.output}" + ("  (already complete: nothing to do)" if self.already_complete else ""),
            f"  sources in        {self.sources_in:>8}",
            f"  restored          {self.restored:>8}"
            + (f"  ({self.restored_now} in this run)" if self.restored_now != self.restored else ""),
            f"  rejected          {self.rejected:>8}",
        ]
        lines += [f"    {reason:<16}{count:>8}" for reason, count in sorted(self.rejected_by_reason.items())]
        lines.append(f"  seconds           {self.seconds:.1f}{rate}")
        return "\n".join(lines)


class RestoreSink(CountingSink):
    """images/ (one file per source, written first), then results/ and rejects/ parts from one write task."""

    def __init__(self, output: str, storage: StorageConfig, max_rows: int, fail_after_rows: int = 0):
        self.output, self.storage, self.max_rows, self.fail_after_rows = output.rstrip("/"), storage, max_rows, fail_after_rows
        self.totals = {}

    def get_name(self) -> str:
        return "RestoreSink"

    def write(self, blocks, ctx) -> dict[str, int]:
        fs, root = filesystem(self.output, self.storage)
        rows, rejects = [], []
        for row in block_rows(blocks):
            (rejects if row.get("reject_reason") else rows).append(row)
        rows.sort(key=lambda row: row["source"])
        committed = 0
        for start in range(0, len(rows), self.max_rows):
            part = rows[start : start + self.max_rows]
            for row in part:
                path = f"{root}/{row['output']}"

                def put(path=path, data=row["image"]) -> None:
                    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                    fs.pipe_file(path, data)

                retrying(put, f"{self.output}/{row['output']}", self.storage, "write")
            table = pa.Table.from_pylist([{name: row[name] for name in RESULT_SCHEMA.names} for row in part], schema=RESULT_SCHEMA)
            commit_table(self.output, self.storage, "results", table, "source")
            committed += len(part)
            if self.fail_after_rows and committed >= self.fail_after_rows:
                raise RuntimeError(f"fault restore.fail_after_rows={self.fail_after_rows}: stopping after {committed} rows")
        if rejects:
            rejects = sorted((reject_row(row) for row in rejects), key=lambda row: row["source"])
            commit_table(self.output, self.storage, "rejects", pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), "source")
        return {"sources": len(rows) + len(rejects), "restored": len(rows), "rejects": len(rejects)}


def fingerprint(
    input_uri: str, weights: str, index: str | None, prompt: str | None, sampler: SamplerConfig, options: RestoreConfig, expert_weights
) -> str:
    payload = {
        "input": input_uri,
        "weights": weights,
        "index": index,
        "prompt": prompt,
        "sampler": sampler.model_dump(mode="json"),
        "restore": options.model_dump(mode="json"),
        "experts": expert_weights,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def restore_batch(
    input_uri: str,
    output_uri: str,
    config: RestoreBatchConfig,
    data: DataBuildConfig,
    weights: str,
    sampler: SamplerConfig,
    options: RestoreConfig,
    storage: StorageConfig | None = None,
    *,
    index: str | None = None,
    prompt: str | None = None,
    expert_weights=None,
    mlflow: MlflowConfig | None = None,
) -> RestoreBatchSummary:
    """Run the job; Ray must be initialised. `weights`: a pinned URI (`runtime.resolve.pin`: models:/NAME/VERSION,
    s3://, a shared path) or a preset name; `index`: a pinned URI of a reference index for references=auto; the
    actors resolve both on their own nodes, `mlflow` saying where models:/ is. InputError for unusable inputs (exit
    2), StorageError / BuildStopped while working (exit 1)."""
    started = time.time()
    storage = storage or StorageConfig()
    mlflow = mlflow or MlflowConfig()
    if input_uri.rstrip("/") == output_uri.rstrip("/"):
        raise InputError("--output must differ from --input")
    check_input(input_uri, storage)
    out_fs, root = filesystem(output_uri, storage)
    try:
        out_fs.makedirs(root, exist_ok=True)
    except Exception as err:
        raise InputError(f"cannot write to output {output_uri}: {type(err).__name__}: {err}") from err
    fp = fingerprint(input_uri, weights, index, prompt, sampler, options, expert_weights)
    manifest = read_json(out_fs, f"{root}/{MANIFEST}", storage)
    if manifest and manifest.get("fingerprint") not in (None, fp):
        raise InputError(f"{output_uri} holds restorations of another input, model or settings; choose a new --output or remove it")
    if manifest and manifest.get("complete"):
        return _summary(output_uri, manifest, already_complete=True)
    write_json(out_fs, f"{root}/{MANIFEST}", {"complete": False, "fingerprint": fp, "input": input_uri, "started": started})
    needs = check_cpus_left(
        config.actors * config.num_cpus, 1.0, "the Restorer actor pool", "lower restore_batch.num_cpus or actors",
        gpus=config.actors * config.num_gpus,
    )  # fmt: skip

    ray.data.DataContext.get_current().raise_original_map_exception = True
    timer = start_stage_timer()
    input_root = _source_prefix(input_uri, storage)
    max_chars = data.source.max_caption_chars

    def decode(batch: dict) -> dict:  # decode only: restore-batch restores what it is given (no quality filter)
        return batch_of([decode_row(row, data.decode, max_chars) if not is_rejected(row) else row for row in rows_of(batch)])

    from pipelines.stages.restore import RestoreStage

    job_started = time.perf_counter()
    with plain_job_errors():
        listing = list_sources(input_uri, data.source, storage)
        finished = finished_sources(out_fs, root, output_uri, storage, ("results", "rejects"))
        if finished.count:
            log.info("resuming: %d sources already restored or rejected", finished.count)
        pending = with_known(listing, finished.notes, finished.count)
    rows = source_rows(pending.units, pending.count, data, storage).map_batches(read_stage(timer, "read", data))
    rows = rows.map_batches(decode, batch_size=8).map_batches(
        RestoreStage,
        fn_constructor_kwargs={
            "weights": weights,
            "index": index,
            "storage": storage.model_dump(),
            "mlflow": mlflow.model_dump(),
            "sampler": sampler.model_dump(),
            "options": options.model_dump(),
            "prompt": prompt,
            "expert_weights": expert_weights,
            "num_gpus": config.num_gpus,
            "input_root": input_root,
            "output_format": config.output_format,
            "timer": timer,
        },
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.num_cpus,
        num_gpus=config.num_gpus,
    )
    sink = RestoreSink(output_uri, storage, config.max_rows_per_shard, faults.fault("restore.fail_after_rows"))
    with awaiting_resources(needs, "the Restorer actor pool"), plain_job_errors():
        rows.write_datasink(sink)
    counts = count_output(out_fs, root, output_uri, storage, None)
    by_reason = counts.rejected_by_reason
    found = table_dataset(out_fs, root, output_uri, "results", ["source"], storage)
    restored = found[1] if found is not None else 0
    sources = finished.count + sink.totals.get("sources", 0)
    if sources != restored + sum(by_reason.values()):
        raise RestorayError(f"{output_uri}: {sources} sources but {restored} restored + {sum(by_reason.values())} rejected; inconsistent")
    manifest = {
        "complete": True,
        "fingerprint": fp,
        "input": input_uri,
        "input_format": listing.format,
        "weights": weights,
        "index": index,
        "sources_in": sources,
        "restored": restored,
        "restored_now": sink.totals.get("restored", 0),
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": by_reason,
        "seconds": round(time.perf_counter() - job_started, 2),
        "sampler": sampler.model_dump(mode="json"),
        "restore": options.model_dump(mode="json"),
        "started": started,
        "finished": time.time(),
    }
    retrying(lambda: write_json(out_fs, f"{root}/{MANIFEST}", manifest), f"{output_uri}/{MANIFEST}", storage, "write")
    return _summary(output_uri, manifest)


def _source_prefix(input_uri: str, storage: StorageConfig) -> str:
    """What every source URI of this input starts with (outputs are named after the rest): the input directory, or
    the directory of an input file, spelled as the sources spell it (absolute local paths, s3:// URIs)."""
    fs, path = filesystem(input_uri, storage)
    directory = path if fs.isdir(path) else path.rsplit("/", 1)[0]
    return f"s3://{directory.rstrip('/')}" if is_remote(input_uri) else os.path.abspath(directory)


def _summary(output_uri: str, manifest: dict, already_complete: bool = False) -> RestoreBatchSummary:
    return RestoreBatchSummary(
        output=output_uri,
        sources_in=manifest["sources_in"],
        restored=manifest["restored"],
        restored_now=0 if already_complete else manifest["restored_now"],
        rejected=manifest["rejected"],
        rejected_by_reason=manifest["rejected_by_reason"],
        seconds=0.0 if already_complete else manifest["seconds"],
        already_complete=already_complete,
    )
