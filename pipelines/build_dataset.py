"""`restoray data build`: corpus -> training shards, on Ray Data.

Stages (DESIGN.md's order): read -> decode -> basic quality -> dedup -> CLIP embedding (aesthetic) -> caption ->
image-text score -> crop -> degrade -> write (shards and rejects through one sink) -> generated negatives (SUPIR's
negative-quality samples from the preset's SDXL, when `data.negatives.count` > 0; written through the same sink) ->
manifest.

Dedup needs every image's hashes before it can decide, so when it is on a first, lighter pass (read, decode,
quality, hashes) collects (source, sha256, phash) for the images that pass quality; the driver groups them and
the main pass rejects the duplicates at the dedup stage. The scan is cached in the output, so a resumed build
does not repeat it.

Resume: committed shard and reject files name their sources. A re-run skips sources already complete (all
variants written, or rejected) before decoding them, skips sample ids already written, and a re-run of a
completed build with the same input and config is a no-op that says so. `retry_rejected` drops the reject rows of
the given reasons first (e.g. `read_error` after an outage), so those sources are read again.

Failures: a storage failure that outlasts the retries (runtime/storage.py) stops the build with `StorageError`
(exit 1) and writes no reject for it; so does a `read_error` share above `data.source.max_read_error_share` once
`data.source.read_error_min_sources` sources were read (something is wrong with the corpus or its storage, not
with a few files). A corrupt manifest or scan file in the output is an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipelines import duplicates
from pipelines.config import DataBuildConfig
from pipelines.rows import REASONS, batch_of, is_rejected, row_stage, rows_of
from pipelines.sink import ShardSink
from pipelines.sources import list_units, read_units
from pipelines.stages.crop import crop_row
from pipelines.stages.decode import decode_row
from pipelines.stages.dedup import dedup_row, hashes_row
from pipelines.stages.degrade import DegradeStage
from pipelines.stages.quality import quality_row
from pipelines.timer import start_stage_timer
from restoration.degradations import REGISTRY
from restoration.errors import InputError, RestorayError
from runtime import faults
from runtime.config import StorageConfig
from runtime.resources import awaiting_resources, check_cpus_left
from runtime.storage import filesystem, find_cause, retrying, storage_cause

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
SCAN = "_work/scan.parquet"


@dataclass
class BuildSummary:
    output: str
    sources_in: int = 0
    sources_accepted: int = 0
    sources_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    samples_written: int = 0
    samples_by_kind: dict[str, int] = field(default_factory=dict)
    negatives_generated: int = 0
    stage_rows_per_second: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    already_complete: bool = False

    def table(self) -> str:
        lines = [
            f"dataset build: {self.output}" + ("  (already complete: nothing to do)" if self.already_complete else ""),
            f"  sources in        {self.sources_in:>8}",
            f"  accepted          {self.sources_accepted:>8}",
            f"  rejected          {self.sources_rejected:>8}",
        ]
        lines += [f"    {reason:<16}{count:>8}" for reason, count in sorted(self.rejected_by_reason.items())]
        if self.negatives_generated:
            lines.append(f"  generated negatives {self.negatives_generated:>6}  (samples without a source; in the kinds below)")
        lines.append(
            f"  samples written   {self.samples_written:>8}  " + ", ".join(f"{k} {v}" for k, v in sorted(self.samples_by_kind.items()))
        )
        if self.stage_rows_per_second:
            lines.append("  rows/s per busy core, by stage:")
            lines += [f"    {stage:<16}{rate:>8.1f}" for stage, rate in self.stage_rows_per_second.items()]
        if not self.already_complete:
            lines.append(f"  wall time         {self.seconds:>8.1f} s")
        return "\n".join(lines)


def fingerprint(input_uri: str, config: DataBuildConfig, preset: str) -> str:
    payload = json.dumps({"input": input_uri, "config": config.model_dump(mode="json"), "preset": preset}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class BuildStopped(RestorayError):
    """The build stopped while working for a reason that is not one source's (exit 1)."""


def read_json(fs, path: str, storage: StorageConfig) -> dict | None:
    """The JSON file's content; None only when the file does not exist. A corrupt file is an error naming it."""

    def read() -> bytes | None:
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as handle:
            return handle.read()

    payload = retrying(read, path, storage)
    if payload is None:
        return None
    try:
        value = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is corrupt ({err}); remove it (or the whole output) to build afresh") from None
    if not isinstance(value, dict):
        raise InputError(f"{path} is corrupt (not a JSON object); remove it (or the whole output) to build afresh")
    return value


def parquet_files(fs, root: str, name: str) -> list[str]:
    directory = f"{root}/{name}"
    # Write tasks add files behind this process's back; s3fs would answer from the listing it cached earlier.
    fs.invalidate_cache(directory)
    if not fs.exists(directory):
        return []
    return sorted(p for p in fs.find(directory) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("."))


def read_parquet(fs, path: str, storage: StorageConfig, columns: list[str] | None = None) -> pa.Table:
    def read() -> pa.Table:
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)

    try:
        return retrying(read, path, storage)
    except (pa.ArrowInvalid, EOFError) as err:
        raise InputError(f"{path} is corrupt ({err}); remove it to rebuild what it held") from None


def read_table(fs, root: str, name: str, columns: list[str], storage: StorageConfig) -> pa.Table | None:
    files = parquet_files(fs, root, name)
    if not files:
        return None
    return pa.concat_tables([read_parquet(fs, path, storage, columns) for path in files])


def _drop_rejects(fs, root: str, reasons: set[str], storage: StorageConfig) -> int:
    """Remove the reject rows of `reasons` (each file rewritten without them), so resume reads those sources again."""
    dropped = 0
    for path in parquet_files(fs, root, "rejects"):
        table = read_parquet(fs, path, storage)
        keep = [reason not in reasons for reason in table.column("reason").to_pylist()]
        if all(keep):
            continue
        dropped += keep.count(False)
        kept = table.filter(pa.array(keep))
        if kept.num_rows:
            directory, name = path.rsplit("/", 1)
            replacement = f"{directory}/{name.removesuffix('.parquet')}-kept.parquet"
            partial = f"{directory}/.{name}.partial"
            with fs.open(partial, "wb") as handle:
                pq.write_table(kept, handle, compression="zstd")
            fs.mv(partial, replacement)
        fs.rm(path)
    return dropped


def _existing_output(fs, root: str, variants: int, storage: StorageConfig) -> tuple[set[str], frozenset[str]]:
    """(sources already complete, sample ids of sources written only in part)."""
    done: set[str] = set()
    partial_ids: set[str] = set()
    rejects = read_table(fs, root, "rejects", ["source"], storage)
    if rejects is not None:
        done.update(rejects.column("source").to_pylist())
    shards = read_table(fs, root, "shards", ["source", "id"], storage)
    if shards is not None:
        by_source: dict[str, list[str]] = {}
        for source, sample in zip(shards.column("source").to_pylist(), shards.column("id").to_pylist(), strict=True):
            by_source.setdefault(source, []).append(sample)
        for source, ids in by_source.items():
            if len(set(ids)) >= variants:
                done.add(source)
            else:
                partial_ids.update(ids)
    return done, frozenset(partial_ids)


_object_cache: dict[str, Any] = {}


@contextmanager
def plain_job_errors() -> Iterator[None]:
    """Ray wraps what a task raised (posing as it): a storage failure or a stopped build inside is raised as its plain
    self, not as a remote traceback (every job of this package runs its Ray Data work inside this)."""
    try:
        yield
    except Exception as err:
        cause = storage_cause(err) or find_cause(err, BuildStopped)
        if cause is not None and cause is not err:
            raise cause from None
        raise


def get_cached(ref_holder: dict) -> Any:
    key = ref_holder["key"]
    if key not in _object_cache:
        _object_cache[key] = ray.get(ref_holder["ref"])
    return _object_cache[key]


def broadcast(value: Any) -> dict:
    """Put a read-only value in the object store once; tasks fetch it once per worker process."""
    return {"key": f"{id(value)}-{time.monotonic_ns()}", "ref": ray.put(value)}


def read_stage(timer, label: str, skip: dict | None, config: DataBuildConfig):
    max_share, min_sources = config.source.max_read_error_share, config.source.read_error_min_sources

    def udf(batch: dict) -> dict:
        rows = rows_of(batch)
        done = get_cached(skip) if skip else set()
        kept = [row for row in rows if row["source"] not in done]
        read_errors = sum(1 for row in kept if (row.get("error") or "").startswith("read_error"))
        # Counted, not timed (reading happens in read_units); the answer is the build's running totals.
        total, total_errors = ray.get(timer.count_reads.remote(label, len(rows), read_errors))
        if done:
            ray.get(timer.add.remote("skipped (already written)", len(rows) - len(kept), 0.0))
        if total >= min_sources and total_errors > max_share * total:
            raise BuildStopped(
                f"{total_errors} of the first {total} sources could not be read (read_error), more than "
                f"data.source.max_read_error_share = {max_share:g}: the corpus or its storage is broken, not a few files; "
                f"fix it and rerun (add --retry-rejected read_error to read the rejected ones again)"
            )
        return batch_of(kept)

    return udf


def source_rows(units: list[dict], config: DataBuildConfig, storage: StorageConfig) -> ray.data.Dataset:
    blocks = max(1, min(len(units), config.source.read_parallelism * 4))
    return ray.data.from_items(units, override_num_blocks=blocks).map_batches(
        read_units, batch_size=1, fn_kwargs={"config": config.source, "storage": storage}
    )


def front_stages(dataset: ray.data.Dataset, config: DataBuildConfig, timer, prefix: str = "") -> ray.data.Dataset:
    max_chars = config.source.max_caption_chars

    def decode(row: dict) -> dict:
        return decode_row(row, config.decode, max_chars)

    # Decode must also see rows with read errors (to turn them into rejects), so it is not a row_stage.
    def decode_udf(batch: dict) -> dict:
        started = time.perf_counter()
        rows = [decode(row) if not is_rejected(row) else row for row in rows_of(batch)]
        ray.get(timer.add.remote(prefix + "decode", len(rows), time.perf_counter() - started))
        return batch_of(rows)

    return dataset.map_batches(decode_udf, batch_size=8).map_batches(
        row_stage(prefix + "quality", lambda row: quality_row(row, config.quality), timer), batch_size=8
    )


def _scan_duplicates(units, config: DataBuildConfig, storage: StorageConfig, fs, root: str, fp: str, timer) -> dict[str, tuple[str, str]]:
    cached = read_json(fs, f"{root}/_work/scan.json", storage)
    if cached and cached.get("fingerprint") == fp and fs.exists(f"{root}/{SCAN}"):
        table = read_parquet(fs, f"{root}/{SCAN}", storage)
        log.info("dedup: reusing the hash scan of an earlier run (%d images)", table.num_rows)
    else:
        read = read_stage(timer, "scan", None, config)
        scan = front_stages(source_rows(units, config, storage).map_batches(read), config, timer, "scan: ")

        def hashes(batch: dict) -> dict:
            rows = [hashes_row(row) for row in rows_of(batch) if not is_rejected(row)]
            return {
                "source": [row["source"] for row in rows],
                "sha256": [row["sha256"] for row in rows],
                "phash": [row["phash"] for row in rows],
            }

        table = pa.concat_tables(
            [
                pa.Table.from_pydict(b, schema=_SCAN_SCHEMA)
                for b in scan.map_batches(hashes, batch_size=8).iter_batches(batch_format="pyarrow")
            ]
            or [_SCAN_SCHEMA.empty_table()]
        )
        fs.makedirs(f"{root}/_work", exist_ok=True)
        with fs.open(f"{root}/{SCAN}", "wb") as handle:
            pq.write_table(table, handle)
        with fs.open(f"{root}/_work/scan.json", "wb") as handle:
            handle.write(json.dumps({"fingerprint": fp, "images": table.num_rows}).encode())
    # The decisions in Ray tasks (pipelines/duplicates.py): hash groups and band buckets shuffled by key, Hamming
    # distances vectorised, only the duplicates return.
    return duplicates.find_duplicates(ray.data.from_arrow(table), config.dedup, duplicates.partitions_for(table.num_rows))


_SCAN_SCHEMA = pa.schema([("source", pa.string()), ("sha256", pa.string()), ("phash", pa.int64())])


def build_dataset(
    input_uri: str,
    output_uri: str,
    config: DataBuildConfig,
    preset: str,
    storage: StorageConfig | None = None,
    *,
    listed: tuple[str, list[dict]] | None = None,
    retry_rejected: tuple[str, ...] = (),
) -> BuildSummary:
    """Run the build; Ray must be initialised by the caller. Raises InputError for unusable inputs/outputs (exit 2),
    StorageError / BuildStopped when it stops while working (exit 1).

    `listed` is `list_units`' result when the caller already listed the input (listing a large S3 prefix is slow).
    `retry_rejected`: reject reasons whose sources are read again (their reject rows are dropped first).
    """
    started = time.time()
    storage = storage or StorageConfig()
    unknown = sorted(set(retry_rejected) - set(REASONS))
    if unknown:
        raise InputError(f"--retry-rejected: unknown reasons {', '.join(unknown)}; reasons: {', '.join(REASONS)}")
    if input_uri.rstrip("/") == output_uri.rstrip("/"):
        raise InputError("--output must differ from --input")
    units_format, units = listed if listed is not None else list_units(input_uri, config.source, storage)
    out_fs, root = filesystem(output_uri, storage)
    try:
        out_fs.makedirs(root, exist_ok=True)
    except Exception as err:
        raise InputError(f"cannot write to output {output_uri}: {type(err).__name__}: {err}") from err
    fp = fingerprint(input_uri, config, preset)
    manifest = read_json(out_fs, f"{root}/{MANIFEST}", storage)
    if manifest and manifest.get("fingerprint") not in (None, fp):
        raise InputError(f"{output_uri} holds a build of another input or config; choose a new --output or remove it")
    if retry_rejected:
        dropped = _drop_rejects(out_fs, root, set(retry_rejected), storage)
        log.info("retry-rejected %s: %d rejected sources will be read again", ",".join(retry_rejected), dropped)
        if dropped and out_fs.exists(f"{root}/_work/scan.json"):
            out_fs.rm(f"{root}/_work/scan.json")  # the dedup scan never saw those sources
        if dropped:
            manifest = None
    if manifest and manifest.get("complete") and manifest.get("fingerprint") == fp:
        return _summary_from_manifest(output_uri, manifest)
    write_json(out_fs, f"{root}/{MANIFEST}", {"complete": False, "fingerprint": fp, "input": input_uri, "started": started})

    needs = _check_resources(config)
    # A UDF's own exception (StorageError, BuildStopped) reaches the driver as itself, not as a UserCodeException.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    with awaiting_resources(needs, "the data build's actor pools"), plain_job_errors():
        summary = _run(units, units_format, input_uri, output_uri, config, preset, storage, out_fs, root, fp, started)
    return summary


def _run(units, units_format, input_uri, output_uri, config: DataBuildConfig, preset, storage, out_fs, root, fp, started) -> BuildSummary:
    timer = start_stage_timer()
    decisions: dict[str, tuple[str, str]] = {}
    if config.dedup.exact or config.dedup.perceptual:
        decisions = _scan_duplicates(units, config, storage, out_fs, root, fp, timer)
    done, partial_ids = _existing_output(out_fs, root, config.degrade.variants, storage)
    if done or partial_ids:
        log.info("resuming: %d sources already written, %d sample ids of partly written sources", len(done), len(partial_ids))

    rows = source_rows(units, config, storage).map_batches(read_stage(timer, "read", broadcast(done) if done else None, config))
    rows = front_stages(rows, config, timer)
    if decisions:
        decisions_ref = broadcast(decisions)
        rows = rows.map_batches(row_stage("dedup", lambda row: dedup_row(row, get_cached(decisions_ref)), timer), batch_size=8)
    # Model stages are imported only when used: torch and transformers cost every Ray worker seconds to import.
    if config.embed.enabled:
        from pipelines.stages.embed import ClipScoreStage, EmbedStage

        rows = _actor_stage(rows, EmbedStage, preset, config.embed, timer)
    if config.caption.mode != "keep-source":
        from pipelines.stages.caption import CaptionStage

        rows = _actor_stage(rows, CaptionStage, preset, config.caption, timer)
    if config.embed.enabled:
        rows = _actor_stage(rows, ClipScoreStage, preset, config.embed, timer)
    rows = rows.map_batches(row_stage("crop", lambda row: crop_row(row, config.crop, config.seed), timer), batch_size=8)
    samples = rows.map_batches(DegradeStage(config.degrade, config.seed, timer).__call__, batch_size=4)
    fail_after_rows = faults.fault("build.fail_after_rows")
    samples.write_datasink(ShardSink(output_uri, storage, config.write.max_rows_per_shard, partial_ids, fail_after_rows))
    if config.embed.enabled and config.dedup.clip_threshold is not None:
        _clip_dedup(out_fs, root, output_uri, config.dedup.clip_threshold, storage)
    if config.negatives.count:
        _generate_negatives(config, preset, storage, out_fs, root, output_uri, timer)

    summary = _summarise(out_fs, root, output_uri, ray.get(timer.totals.remote()), started, storage)
    manifest = {
        "complete": True,
        "fingerprint": fp,
        "input": input_uri,
        "input_format": units_format,
        "sources_in": summary.sources_in,
        "sources_accepted": summary.sources_accepted,
        "sources_rejected": summary.sources_rejected,
        "rejected_by_reason": summary.rejected_by_reason,
        "samples_written": summary.samples_written,
        "samples_by_kind": summary.samples_by_kind,
        "negatives_generated": summary.negatives_generated,
        "config": config.model_dump(mode="json"),
        "preset": preset,
        "degradation_types": {str(k): v for k, v in REGISTRY.id_to_name().items()},
        "stage_rows_per_second": summary.stage_rows_per_second,
        "packages": {name: version(name) for name in ("ray", "numpy", "opencv-python-headless", "pillow", "torch", "pyarrow")},
        "python": platform.python_version(),
        "started": started,
        "finished": time.time(),
    }
    write_json(out_fs, f"{root}/{MANIFEST}", manifest)
    return summary


def _clip_dedup(fs, root: str, output_uri: str, threshold: float, storage: StorageConfig) -> None:
    """The second global pass: CLIP near-duplicates among the written sources (pipelines/stages/dedup.py) become
    clip_duplicate rejects, then every rejected source's rows leave shards/ and embeddings/. Idempotent: a rerun after
    an interruption finds the same decisions and finishes the removal."""
    from pipelines.sink import commit_table
    from pipelines.stages.dedup import find_clip_duplicates
    from restoration.dataset import REJECT_SCHEMA, embedding_matrix

    embeddings = read_table(fs, root, "embeddings", ["source", "embedding"], storage)
    if embeddings is None:
        return
    rejects = read_table(fs, root, "rejects", ["source"], storage)
    rejected = set(rejects.column("source").to_pylist()) if rejects is not None else set()
    latest: dict[str, bytes] = {}
    for source, value in zip(embeddings.column("source").to_pylist(), embeddings.column("embedding").to_pylist(), strict=True):
        if source not in rejected:
            latest[source] = value
    sources = sorted(latest)
    dropped = find_clip_duplicates(sources, embedding_matrix([latest[s] for s in sources]), threshold) if sources else {}
    if dropped:
        log.info("CLIP near-duplicates: %d sources (cosine >= %g)", len(dropped), threshold)
        rows = [{"source": s, "stage": "clip_dedup", "reason": "clip_duplicate", "detail": detail} for s, detail in sorted(dropped.items())]
        commit_table(output_uri.rstrip("/"), storage, "rejects", pa.Table.from_pylist(rows, schema=REJECT_SCHEMA), "source")
        rejected |= set(dropped)
    for table_name in ("shards", "embeddings"):
        for path in parquet_files(fs, root, table_name):
            table = read_parquet(fs, path, storage)
            keep = pc.invert(pc.is_in(table.column("source"), pa.array(sorted(rejected), pa.string())))
            if pc.all(keep).as_py():
                continue
            kept = table.filter(keep)
            if kept.num_rows == 0:
                fs.rm(path)
                continue
            directory, name = path.rsplit("/", 1)
            partial = f"{directory}/.{name}.partial"
            with fs.open(partial, "wb") as handle:
                pq.write_table(kept, handle, compression="zstd")
            fs.mv(partial, path)  # keeps its name: a rerun of the same build rewrites it the same way


def _generate_negatives(config: DataBuildConfig, preset: str, storage: StorageConfig, fs, root: str, output_uri: str, timer) -> None:
    """SDXL-generated negative samples (pipelines/stages/generate.py); those already written are not generated again."""
    from pipelines.stages.generate import GenerateNegativesStage, negative_id, negative_seed
    from restoration.prompts import NEGATIVE_QUALITY_PROMPT

    negatives = config.negatives
    shards = read_table(fs, root, "shards", ["id", "kind"], storage)
    written = set(shards.filter(pc.equal(shards.column("kind"), "negative")).column("id").to_pylist()) if shards is not None else set()
    todo = [i for i in range(negatives.count) if negative_id(NEGATIVE_QUALITY_PROMPT, negative_seed(config.seed, i)) not in written]
    if not todo:
        return
    log.info("generating %d negative-quality samples with the %s SDXL (%d already written)", len(todo), preset, negatives.count - len(todo))
    size = negatives.size or config.crop.size
    generated = ray.data.from_items(
        [{"index": i} for i in todo], override_num_blocks=max(1, len(todo) // negatives.batch_size)
    ).map_batches(
        GenerateNegativesStage,
        fn_constructor_kwargs={
            "preset": preset,
            "config": negatives,
            "seed": config.seed,
            "size": size,
            "image_format": config.degrade.image_format,
            "chains": config.degrade,
            "timer": timer,
        },
        batch_size=negatives.batch_size,
        compute=ray.data.ActorPoolStrategy(size=negatives.actors),
        num_cpus=negatives.num_cpus,
        num_gpus=negatives.num_gpus,
    )
    generated.write_datasink(ShardSink(output_uri, storage, config.write.max_rows_per_shard, frozenset(written)))


def _actor_stage(rows: ray.data.Dataset, stage_class, preset: str, stage_config, timer) -> ray.data.Dataset:
    """A model stage: an actor pool that loads the model once per actor."""
    return rows.map_batches(
        stage_class,
        fn_constructor_kwargs={"preset": preset, "config": stage_config, "timer": timer},
        batch_size=stage_config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=stage_config.actors),
        num_cpus=stage_config.num_cpus,
        num_gpus=stage_config.num_gpus,
    )


def _check_resources(config: DataBuildConfig) -> dict[str, float]:
    """Actor pools hold their CPUs for the whole run; the task stages need at least one CPU beside them. Returns the
    resources the main pass holds at once."""
    reserved = gpus = 0.0
    if config.embed.enabled:
        reserved += 2 * config.embed.actors * config.embed.num_cpus  # embedding and image-text score pools
        gpus += 2 * config.embed.actors * config.embed.num_gpus
    if config.caption.mode != "keep-source":
        reserved += config.caption.actors * config.caption.num_cpus
        gpus += config.caption.actors * config.caption.num_gpus
    # The negatives' pool starts after the main pass has finished: it never runs beside the others.
    if config.negatives.count:
        reserved = max(reserved, config.negatives.actors * config.negatives.num_cpus)
        gpus = max(gpus, config.negatives.actors * config.negatives.num_gpus)
    return check_cpus_left(
        reserved,
        1.0,
        "the model stages' actor pools",
        "lower data.embed.num_cpus / data.caption.num_cpus or their actors, or add CPUs",
        gpus=gpus,
    )


def _summarise(fs, root: str, output_uri: str, totals: dict, started: float, storage: StorageConfig) -> BuildSummary:
    shards = read_table(fs, root, "shards", ["source", "id", "kind"], storage)
    rejects = read_table(fs, root, "rejects", ["source", "reason"], storage)
    # Generated negatives are samples without a source: they stay out of the source accounting.
    kinds = shards.column("kind").to_pylist() if shards is not None else []
    sources = shards.column("source").to_pylist() if shards is not None else []
    accepted = {source for source, kind in zip(sources, kinds, strict=True) if kind != "negative"}
    reject_sources = rejects.column("source").to_pylist() if rejects is not None else []
    by_reason: dict[str, int] = {}
    for reason in rejects.column("reason").to_pylist() if rejects is not None else []:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    by_kind: dict[str, int] = {}
    for kind in shards.column("kind").to_pylist() if shards is not None else []:
        by_kind[kind] = by_kind.get(kind, 0) + 1
    ids = shards.column("id").to_pylist() if shards is not None else []
    if len(ids) != len(set(ids)):
        raise RestorayError(f"{output_uri}: {len(ids) - len(set(ids))} duplicate sample ids in the shards")
    if len(reject_sources) != len(set(reject_sources)) or accepted & set(reject_sources):
        raise RestorayError(f"{output_uri}: a source is both accepted and rejected, or rejected twice")
    sources_in = totals.get("read", (0, 0.0))[0]
    summary = BuildSummary(
        output=output_uri,
        sources_in=sources_in,
        sources_accepted=len(accepted),
        sources_rejected=len(reject_sources),
        rejected_by_reason=by_reason,
        samples_written=len(ids),
        samples_by_kind=by_kind,
        negatives_generated=by_kind.get("negative", 0),
        stage_rows_per_second={stage: rows / seconds for stage, (rows, seconds) in totals.items() if seconds > 0},
        seconds=time.time() - started,
    )
    if summary.sources_in != summary.sources_accepted + summary.sources_rejected:
        raise RestorayError(
            f"{output_uri}: {summary.sources_in} sources read but {summary.sources_accepted} accepted + "
            f"{summary.sources_rejected} rejected; the output is inconsistent"
        )
    return summary


def _summary_from_manifest(output_uri: str, manifest: dict) -> BuildSummary:
    return BuildSummary(
        output=output_uri,
        sources_in=manifest["sources_in"],
        sources_accepted=manifest["sources_accepted"],
        sources_rejected=manifest["sources_rejected"],
        rejected_by_reason=manifest["rejected_by_reason"],
        samples_written=manifest["samples_written"],
        samples_by_kind=manifest.get("samples_by_kind", {}),
        negatives_generated=manifest.get("negatives_generated", 0),
        already_complete=True,
    )


def write_json(fs, path: str, payload: dict) -> None:
    partial = f"{path}.partial"
    with fs.open(partial, "wb") as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=True).encode())
    fs.mv(partial, path)
