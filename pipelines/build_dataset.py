"""`restoray data build`: corpus -> training shards, on Ray Data: the job as its sequence of passes.

1. listing (pipelines/listing.py): the corpus's units of work, listed in Ray tasks;
2. dedup (when exact or perceptual dedup is on): a first, lighter read (read, decode, quality, hashes) writes
   (source, sha256, phash) to _work/scan/ and pipelines/duplicates.py decides in Ray tasks; the scan is kept with
   the config's fingerprint, so a resumed build does not repeat it;
3. resume (pipelines/resume.py): the sources an earlier run finished;
4. known sources (pipelines/known_sources.py): the duplicate decisions and finished sources joined onto the units
   that hold them, so a read task skips finished sources and rejects duplicates without reading either;
5. the main pass: read -> decode -> basic quality -> CLIP embedding (aesthetic) -> caption -> image-text score ->
   crop -> degrade -> write (shards and rejects through one sink, whose write results count the sources);
6. semantic dedup (pipelines/semantic_dedup.py, with embeddings and data.dedup.clip_threshold);
7. generated negatives (SUPIR's negative-quality samples from the preset's SDXL, `data.negatives.count` > 0);
8. counts (pipelines/counts.py) and the manifest.

Resume: committed shard and reject files name their sources. A re-run skips sources already complete (all
variants written, or rejected) before reading them, skips sample ids already written, and a re-run of a completed
build with the same input and config is a no-op that says so. `retry_rejected` drops the reject rows of the given
reasons first (e.g. `read_error` after an outage), so those sources are read again.

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
from dataclasses import dataclass, field
from importlib.metadata import version

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipelines import duplicates
from pipelines.config import DataBuildConfig
from pipelines.counts import count_output
from pipelines.known_sources import as_notes, with_known
from pipelines.listing import Listing, check_input, list_sources
from pipelines.outputs import parquet_files, read_json, read_parquet, table_dataset, write_json
from pipelines.reading import BuildStopped, front_stages, plain_job_errors, read_stage, source_rows
from pipelines.resume import finished_sources
from pipelines.rows import REASONS, is_rejected, row_stage, rows_of
from pipelines.sink import ShardSink
from pipelines.stages.crop import crop_row
from pipelines.stages.dedup import hashes_row
from pipelines.stages.degrade import DegradeStage
from pipelines.timer import start_stage_timer
from restoration.degradations import REGISTRY
from restoration.errors import InputError, RestorayError
from runtime import faults
from runtime.config import StorageConfig
from runtime.resources import awaiting_resources, check_cpus_left
from runtime.storage import arrow_filesystem, filesystem, full_uri

__all__ = ["BuildStopped", "BuildSummary", "build_dataset"]
log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
SCAN = "_work/scan"  # the dedup scan's parquet files; its fingerprint in _work/scan.json


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


def _rewrite_rejects(batch: dict, reasons: list[str], storage: StorageConfig) -> dict:
    """Each rejects file without the rows of `reasons` (a Ray task per batch of files); the rows dropped."""
    dropped = []
    for path in batch["path"]:
        fs, local = filesystem(str(path), storage)
        table = read_parquet(fs, local, storage)
        drop = pc.is_in(table.column("reason"), pa.array(reasons, pa.string()))
        count = int(pc.sum(drop).as_py() or 0)
        dropped.append(count)
        if not count:
            continue
        kept = table.filter(pc.invert(drop))
        if kept.num_rows:
            directory, name = local.rsplit("/", 1)
            partial = f"{directory}/.{name}.partial"
            with fs.open(partial, "wb") as handle:
                pq.write_table(kept, handle, compression="zstd")
            fs.mv(partial, f"{directory}/{name.removesuffix('.parquet')}-kept.parquet")
        fs.rm(local)
    return {"dropped": np.array(dropped, dtype=np.int64)}


def _drop_rejects(fs, root: str, output_uri: str, reasons: set[str], storage: StorageConfig) -> int:
    """Remove the reject rows of `reasons` (each file rewritten without them, in Ray tasks), so resume reads those
    sources again; the number of rows dropped."""
    files = [full_uri(fs, path) for path in parquet_files(fs, root, "rejects")]
    if not files:
        return 0
    rewritten = ray.data.from_items([{"path": path} for path in files]).map_batches(
        _rewrite_rejects, fn_kwargs={"reasons": sorted(reasons), "storage": storage}, batch_size=16
    )
    return int(rewritten.sum("dropped") or 0)


def _scan_duplicates(
    listing: Listing, config: DataBuildConfig, storage: StorageConfig, fs, root: str, output_uri: str, fp: str, timer
) -> ray.data.Dataset:
    """The dedup pass: a first, lighter read (read, decode, quality, hashes) writes (source, sha256, phash) of the
    images that pass quality to _work/scan/ from Ray tasks; pipelines/duplicates.py decides in Ray tasks. The scan
    is kept with the config's fingerprint, so a resumed build does not repeat it."""
    cached = read_json(fs, f"{root}/{SCAN}.json", storage)
    if not (cached and cached.get("fingerprint") == fp and fs.exists(f"{root}/{SCAN}")):
        if fs.exists(f"{root}/{SCAN}"):
            fs.rm(f"{root}/{SCAN}", recursive=True)  # an interrupted scan: its files are not all there
        read = read_stage(timer, "scan", config)
        scan = front_stages(source_rows(listing.units, listing.count, config, storage).map_batches(read), config, timer, "scan: ")

        def hashes(batch: dict) -> pa.Table:
            rows = [hashes_row(row) for row in rows_of(batch) if not is_rejected(row)]
            return pa.Table.from_pylist([{name: row[name] for name in _SCAN_SCHEMA.names} for row in rows], schema=_SCAN_SCHEMA)

        pafs, _ = arrow_filesystem(output_uri, storage)
        scan.map_batches(hashes, batch_size=8).write_parquet(
            f"{root}/{SCAN}" if pafs is not None else full_uri(fs, f"{root}/{SCAN}"), filesystem=pafs
        )
        write_json(fs, f"{root}/{SCAN}.json", {"fingerprint": fp})
    else:
        log.info("dedup: reusing the hash scan of an earlier run")
    found = table_dataset(fs, root, output_uri, SCAN, _SCAN_SCHEMA.names, storage)
    if found is None:
        return ray.data.from_arrow(duplicates.DECISION_SCHEMA.empty_table())
    scanned, rows = found
    return duplicates.find_duplicates(scanned, config.dedup, duplicates.partitions_for(rows))


_SCAN_SCHEMA = pa.schema([("source", pa.string()), ("sha256", pa.string()), ("phash", pa.int64())])


def build_dataset(
    input_uri: str,
    output_uri: str,
    config: DataBuildConfig,
    preset: str,
    storage: StorageConfig | None = None,
    *,
    listed: Listing | None = None,
    retry_rejected: tuple[str, ...] = (),
) -> BuildSummary:
    """Run the build; Ray must be initialised by the caller. Raises InputError for unusable inputs/outputs (exit 2),
    StorageError / BuildStopped when it stops while working (exit 1).

    `listed`: the input's listing (`pipelines.listing.list_sources`) when the caller has it already.
    `retry_rejected`: reject reasons whose sources are read again (their reject rows are dropped first).
    """
    started = time.time()
    storage = storage or StorageConfig()
    unknown = sorted(set(retry_rejected) - set(REASONS))
    if unknown:
        raise InputError(f"--retry-rejected: unknown reasons {', '.join(unknown)}; reasons: {', '.join(REASONS)}")
    if input_uri.rstrip("/") == output_uri.rstrip("/"):
        raise InputError("--output must differ from --input")
    check_input(input_uri, storage)
    out_fs, root = filesystem(output_uri, storage)
    try:
        out_fs.makedirs(root, exist_ok=True)
    except Exception as err:
        raise InputError(f"cannot write to output {output_uri}: {type(err).__name__}: {err}") from err
    fp = fingerprint(input_uri, config, preset)
    manifest = read_json(out_fs, f"{root}/{MANIFEST}", storage)
    if manifest and manifest.get("fingerprint") not in (None, fp):
        raise InputError(f"{output_uri} holds a build of another input or config; choose a new --output or remove it")
    ray.data.DataContext.get_current().raise_original_map_exception = True
    if retry_rejected:
        with plain_job_errors():
            dropped = _drop_rejects(out_fs, root, output_uri, set(retry_rejected), storage)
        log.info("retry-rejected %s: %d rejected sources will be read again", ",".join(retry_rejected), dropped)
        if dropped and out_fs.exists(f"{root}/{SCAN}.json"):
            out_fs.rm(f"{root}/{SCAN}.json")  # the dedup scan never saw those sources
        if dropped:
            manifest = None
    if manifest and manifest.get("complete") and manifest.get("fingerprint") == fp:
        return _summary_from_manifest(output_uri, manifest)
    write_json(out_fs, f"{root}/{MANIFEST}", {"complete": False, "fingerprint": fp, "input": input_uri, "started": started})

    needs = _check_resources(config)
    with awaiting_resources(needs, "the data build's actor pools"), plain_job_errors():
        listing = listed or list_sources(input_uri, config.source, storage)
        summary = _run(listing, input_uri, output_uri, config, preset, storage, out_fs, root, fp, started)
    return summary


def _run(listing: Listing, input_uri, output_uri, config: DataBuildConfig, preset, storage, out_fs, root, fp, started) -> BuildSummary:
    timer = start_stage_timer()
    notes: list[ray.data.Dataset] = []
    note_count = 0
    if config.dedup.exact or config.dedup.perceptual:
        decisions = _scan_duplicates(listing, config, storage, out_fs, root, output_uri, fp, timer)
        notes.append(decisions.map_batches(as_notes, batch_format="pyarrow"))
        note_count += decisions.count()
    finished = finished_sources(out_fs, root, output_uri, storage, ("rejects",), ("shards", config.degrade.variants))
    if finished.count or finished.partial_ids:
        log.info("resuming: %d sources already written, %d sample ids of partly written sources", finished.count, len(finished.partial_ids))
    if finished.notes is not None:
        notes.append(finished.notes)
        note_count += finished.count
    pending = with_known(listing, notes[0].union(*notes[1:]) if len(notes) > 1 else (notes[0] if notes else None), note_count)

    rows = source_rows(pending.units, pending.count, config, storage).map_batches(read_stage(timer, "read", config))
    rows = front_stages(rows, config, timer)
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
    sink = ShardSink(output_uri, storage, config.write.max_rows_per_shard, finished.partial_ids, fail_after_rows)
    samples.write_datasink(sink)
    sources_in = finished.count + sink.totals.get("sources", 0)
    if config.embed.enabled and config.dedup.clip_threshold is not None:
        _semantic_dedup(out_fs, root, output_uri, config, storage)
    if config.negatives.count:
        _generate_negatives(config, preset, storage, out_fs, root, output_uri, timer)

    summary = _summarise(out_fs, root, output_uri, sources_in, ray.get(timer.totals.remote()), started, storage)
    manifest = {
        "complete": True,
        "fingerprint": fp,
        "input": input_uri,
        "input_format": listing.format,
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


def _semantic_dedup(fs, root: str, output_uri: str, config: DataBuildConfig, storage: StorageConfig) -> None:
    """The CLIP pass over the written sources (pipelines/semantic_dedup.py): its decisions become clip_duplicate
    rejects (written from Ray tasks), then every rejected source's rows leave shards/ and embeddings/, a file per
    task. Idempotent: a rerun after an interruption finds the same decisions and finishes the removal."""
    from pipelines.semantic_dedup import find_semantic_duplicates

    found = table_dataset(fs, root, output_uri, "embeddings", ["source", "embedding"], storage)
    if found is None:
        return
    embeddings, rows = found
    earlier = table_dataset(fs, root, output_uri, "rejects", ["source", "reason"], storage)
    if earlier is not None:  # an interrupted removal leaves embeddings of sources already rejected
        rejected_refs = earlier[0].select_columns(["source"]).materialize().to_arrow_refs()
        embeddings = embeddings.map_batches(_without_sources, fn_kwargs={"rejected": rejected_refs}, batch_format="pyarrow")
    decisions = find_semantic_duplicates(embeddings, rows, config.dedup, config.seed)
    dropped = decisions.count()
    if dropped:
        log.info("CLIP near-duplicates: %d sources (cosine >= %g)", dropped, config.dedup.clip_threshold)
        decisions.map_batches(_commit_rejects, fn_kwargs={"output": output_uri, "storage": storage}, batch_format="pyarrow").materialize()
    found = table_dataset(fs, root, output_uri, "rejects", ["source"], storage)
    if found is None:
        return
    rejected_refs = found[0].materialize().to_arrow_refs()
    files = [full_uri(fs, path) for name in ("shards", "embeddings") for path in parquet_files(fs, root, name)]
    ray.data.from_items([{"path": path} for path in files]).map_batches(
        _rewrite_without, fn_kwargs={"rejected": rejected_refs, "storage": storage}, batch_size=4
    ).materialize()


def _rejected_set(refs: list) -> pa.Array:
    return pa.concat_arrays([block.column("source").combine_chunks() for block in ray.get(refs)] or [pa.array([], pa.string())])


def _without_sources(batch: pa.Table, rejected: list) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column("source"), _rejected_set(rejected))))


def _commit_rejects(batch: pa.Table, output: str, storage: StorageConfig) -> pa.Table:
    from pipelines.sink import commit_table
    from restoration.dataset import REJECT_SCHEMA

    if batch.num_rows:
        stage = pa.array(["clip_dedup"] * batch.num_rows, pa.string())
        table = pa.table([batch.column("source"), stage, batch.column("reason"), batch.column("detail")], schema=REJECT_SCHEMA)
        commit_table(output.rstrip("/"), storage, "rejects", table.sort_by("source"), "source")
    return pa.table({"written": [batch.num_rows]})


def _rewrite_without(batch: dict, rejected: list, storage: StorageConfig) -> dict:
    """Each file of the batch rewritten (in place, through a temporary name) without the rejected sources' rows."""
    removed = []
    for path in batch["path"]:
        fs, local = filesystem(str(path), storage)
        table = read_parquet(fs, local, storage)
        keep = pc.invert(pc.is_in(table.column("source"), _rejected_set(rejected)))
        kept = table.filter(keep)
        removed.append(table.num_rows - kept.num_rows)
        if kept.num_rows == table.num_rows:
            continue
        if kept.num_rows == 0:
            fs.rm(local)
            continue
        directory, name = local.rsplit("/", 1)
        partial = f"{directory}/.{name}.partial"
        with fs.open(partial, "wb") as handle:
            pq.write_table(kept, handle, compression="zstd")
        fs.mv(partial, local)  # keeps its name: a rerun of the same build rewrites it the same way
    return {"removed": np.array(removed, dtype=np.int64)}


def _generate_negatives(config: DataBuildConfig, preset: str, storage: StorageConfig, fs, root: str, output_uri: str, timer) -> None:
    """SDXL-generated negative samples (pipelines/stages/generate.py); those already written are not generated again."""
    from pipelines.stages.generate import GenerateNegativesStage, negative_id, negative_seed
    from restoration.prompts import NEGATIVE_QUALITY_PROMPT

    negatives = config.negatives
    found = table_dataset(fs, root, output_uri, "shards", ["id", "kind"], storage)
    written: set[str] = set()  # at most data.negatives.count ids
    if found is not None:
        negatives_only = found[0].map_batches(lambda b: b.filter(pc.equal(b.column("kind"), "negative")), batch_format="pyarrow")
        written = {row["id"] for row in negatives_only.take_all()}
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


def _summarise(fs, root: str, output_uri: str, sources_in: int, totals: dict, started: float, storage: StorageConfig) -> BuildSummary:
    counts = count_output(fs, root, output_uri, storage, "shards")
    if counts.repeated_ids:
        raise RestorayError(f"{output_uri}: {counts.repeated_ids} duplicate sample ids in the shards")
    if counts.rejected_twice or counts.accepted_and_rejected:
        raise RestorayError(f"{output_uri}: a source is both accepted and rejected, or rejected twice")
    summary = BuildSummary(
        output=output_uri,
        sources_in=sources_in,
        sources_accepted=counts.accepted_sources,
        sources_rejected=counts.rejected,
        rejected_by_reason=counts.rejected_by_reason,
        samples_written=counts.samples,
        samples_by_kind=counts.samples_by_kind,
        negatives_generated=counts.samples_by_kind.get("negative", 0),
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
