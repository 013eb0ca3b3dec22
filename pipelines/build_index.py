"""`restoray index build`: sources -> open-clip embeddings and a reference store (Ray Data), then a faiss index
(Ray tasks) tuned to a recall target.

Input: a corpus (any source `data build` reads) or a dataset `data build` wrote (then its accepted sources, each
once: shards hold several crops and variants per source; the sources are read from the dataset's corpus). Stage 1,
on Ray Data: read -> decode -> basic quality (the run's data.source/decode/quality) -> embed in an actor pool (or take
the embedding `data build` stored, `--embeddings`) and resize to the restoration model's size -> one sink writing
embeddings/, references/ and rejects/. It resumes as the dataset build does: sources already embedded or rejected
are skipped before they are read (pipelines/resume.py, pipelines/known_sources.py); a dataset's accepted sources and
the stored embeddings of `--embeddings` reach each read task joined onto its own units, never as a dict shipped to
every actor. Stage 2, off the driver and with no process holding every vector: a task streams the embeddings,
sorted by id by Ray Data, into vectors.npy; a task sized from the index plan (`memory`, `num_cpus`) on the same node
picks the index type from the count and index.max_memory, trains on a sample (the file's first rows: id order is a
random order), adds the vectors in parts by Ray tasks reading their own slices (a bounded window) into copies of the
trained empty index, merges them (in memory, or on disk through faiss.contrib.ondisk), tunes search parameters on
held-out queries and writes index.faiss; the driver writes manifest.json. Layout: docs/architecture.md, "Reference
index".
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import resource
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.config import DataBuildConfig, IndexConfig
from pipelines.counts import count_output
from pipelines.known_sources import KEEP, NOTE_SCHEMA, STORED, as_notes, with_known
from pipelines.listing import check_input, list_sources
from pipelines.outputs import parquet_files, read_json, read_parquet, table_dataset, write_json
from pipelines.reading import front_stages, plain_job_errors, read_stage, source_rows
from pipelines.resume import finished_sources
from pipelines.sink import CountingSink, block_rows, commit_table, reject_row
from pipelines.timer import start_stage_timer
from restoration.dataset import EMBEDDING_SCHEMA, REJECT_SCHEMA, embedding_matrix
from restoration.errors import InputError, RestorayError
from restoration.retrieval import index as faiss_index
from restoration.retrieval.references import INDEX_FILE, MANIFEST_FILE, REFERENCE_ROW_GROUP, REFERENCE_SCHEMA, VECTORS_FILE
from runtime import faults
from runtime.config import StorageConfig
from runtime.memory import PrivateMemoryPeak
from runtime.resources import awaiting_resources, check_cpus_left
from runtime.storage import filesystem, full_uri, is_remote, retrying

log = logging.getLogger(__name__)


@dataclass
class IndexSummary:
    output: str
    sources_in: int = 0
    embedded: int = 0
    embedded_now: int = 0  # sources this run embedded (a resumed run skips those already done)
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int = 0
    already_complete: bool = False

    def table(self) -> str:
        lines = [
            f"reference index: {self.output}" + ("  (already complete: nothing to do)" if self.already_complete else ""),
            f"  sources in        {self.sources_in:>8}",
            f"  embedded          {self.embedded:>8}"
            + (f"  ({self.embedded_now} in this run)" if self.embedded_now != self.embedded else ""),
            f"  rejected          {self.rejected:>8}",
        ]
        lines += [f"    {reason:<16}{count:>8}" for reason, count in sorted(self.rejected_by_reason.items())]
        if self.plan:
            disk = " (lists on disk)" if self.plan.get("on_disk") else ""
            lines.append(f"  index             {self.plan['type']}: {self.plan['factory']}{disk}")
        if self.search:
            lines.append(
                f"  search            {self.search.get('faiss') or 'exact'}, re-rank x{self.search.get('rerank', 1)}: "
                f"10-recall@10 {self.search['recall']:.3f}, {self.search['qps']:.0f} q/s "
                f"(exact {self.search['exact_qps']:.0f} q/s) on {self.search['queries']} held-out queries"
            )
        if self.seconds:
            lines.append("  seconds           " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        return "\n".join(lines)


class IndexSink(CountingSink):
    """embeddings/, references/ and rejects/ from one write task: references first, so a source counted as
    embedded (what resume reads) always has its stored image."""

    def __init__(self, output: str, storage: StorageConfig, max_rows: int, fail_after_rows: int = 0):
        self.output = output.rstrip("/")
        self.storage = storage
        self.max_rows = max_rows
        self.fail_after_rows = fail_after_rows  # runtime.faults' index.fail_after_rows (tests)
        self.totals = {}
        self.finished_before = 0

    def get_name(self) -> str:
        return "IndexSink"

    def write(self, blocks, ctx) -> dict[str, int]:
        rows, rejects = [], []
        for row in block_rows(blocks):
            if row.get("reject_reason"):
                rejects.append(reject_row(row))
            else:
                rows.append(row)
        rows.sort(key=lambda row: row["id"])
        committed = 0
        for start in range(0, len(rows), self.max_rows):
            part = rows[start : start + self.max_rows]
            references = pa.Table.from_pylist(
                [{name: row[name] for name in REFERENCE_SCHEMA.names} for row in part], schema=REFERENCE_SCHEMA
            )
            commit_table(self.output, self.storage, "references", references, "id", row_group_size=REFERENCE_ROW_GROUP)
            embeddings = pa.Table.from_pylist(
                [{name: row[name] for name in EMBEDDING_SCHEMA.names} for row in part], schema=EMBEDDING_SCHEMA
            )
            commit_table(self.output, self.storage, "embeddings", embeddings, "id")
            committed += len(part)
            if self.fail_after_rows and committed >= self.fail_after_rows:
                raise RuntimeError(f"fault index.fail_after_rows={self.fail_after_rows}: stopping after {committed} rows")
        if rejects:
            rejects.sort(key=lambda row: row["source"])
            commit_table(self.output, self.storage, "rejects", pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), "source")
        return {"sources": len(rows) + len(rejects), "embedded": len(rows), "rejects": len(rejects)}


def _dataset_sources(fs, root: str, output_uri: str, storage: StorageConfig) -> tuple[str, ray.data.Dataset, int] | None:
    """(its corpus, its accepted sources as `keep` notes, their row count) when `root` is a dataset `data build`
    wrote, else None."""
    manifest = read_json(fs, f"{root}/manifest.json", storage)
    if not manifest or not fs.exists(f"{root}/shards"):
        return None
    if not manifest.get("complete"):
        raise InputError(f"{root} is a dataset build that did not finish; complete it first (rerun `restoray data build`)")
    found = table_dataset(fs, root, output_uri, "shards", ["source", "kind"], storage)
    if found is None:
        return manifest["input"], ray.data.from_arrow(NOTE_SCHEMA.empty_table()), 0
    # Generated negatives have no source; each source's K variants become K notes, merged per source by the join.
    photos = found[0].map_batches(lambda b: b.filter(pc.not_equal(b.column("kind"), "negative")), batch_format="pyarrow")
    notes = photos.map_batches(as_notes, fn_kwargs={"reason": KEEP}, batch_format="pyarrow").materialize()
    return manifest["input"], notes, notes.count()


def stored_embeddings(uri: str, storage: StorageConfig) -> tuple[ray.data.Dataset, int]:
    """A dataset's (its embeddings/) or an embeddings directory's rows as `stored` notes (source, embedding), read
    in Ray tasks, and their count."""
    fs, root = filesystem(uri, storage)
    directory = root if not fs.exists(f"{root}/embeddings") else f"{root}/embeddings"
    files = [path for path in (fs.find(directory) if fs.exists(directory) else []) if path.endswith(".parquet")]
    files = [path for path in files if not path.rsplit("/", 1)[-1].startswith(".")]
    if not files:
        raise InputError(f"--embeddings {uri}: no embeddings parquet files there (a dataset built with data.embed.enabled has embeddings/)")
    from runtime.storage import arrow_filesystem

    pafs, _ = arrow_filesystem(uri, storage)
    table = ray.data.read_parquet(
        [p if pafs is not None else full_uri(fs, p) for p in sorted(files)], filesystem=pafs, columns=["source", "embedding"]
    )
    notes = table.map_batches(as_notes, fn_kwargs={"reason": STORED}, batch_format="pyarrow").materialize()
    return notes, notes.count()


def fingerprint(input_uri: str, config: IndexConfig, data: DataBuildConfig, preset: str, embeddings_uri: str | None) -> str:
    payload = {
        "input": input_uri,
        "index": config.model_dump(mode="json"),
        "source": data.source.model_dump(mode="json"),
        "decode": data.decode.model_dump(mode="json"),
        "quality": data.quality.model_dump(mode="json"),
        "preset": preset,
        "embeddings": embeddings_uri,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_index(
    input_uri: str,
    output_uri: str,
    config: IndexConfig,
    data: DataBuildConfig,
    preset: str,
    storage: StorageConfig | None = None,
    *,
    embeddings_uri: str | None = None,
) -> IndexSummary:
    """Run the build; Ray must be initialised by the caller. InputError for unusable inputs (exit 2), StorageError /
    BuildStopped when it stops while working (exit 1)."""
    from restoration.models.base import load_clip_scorer, native_size
    from restoration.models.presets import load_preset

    started = time.time()
    storage = storage or StorageConfig()
    if input_uri.rstrip("/") == output_uri.rstrip("/"):
        raise InputError("--output must differ from --input")
    spec = load_preset(preset)
    check_input(input_uri, storage)
    out_fs, root = filesystem(output_uri, storage)
    try:
        out_fs.makedirs(root, exist_ok=True)
    except Exception as err:
        raise InputError(f"cannot write to output {output_uri}: {type(err).__name__}: {err}") from err
    fp = fingerprint(input_uri, config, data, preset, embeddings_uri)
    manifest = read_json(out_fs, f"{root}/{MANIFEST_FILE}", storage)
    if manifest and manifest.get("fingerprint") not in (None, fp):
        raise InputError(f"{output_uri} holds an index of another input or config; choose a new --output or remove it")
    if manifest and manifest.get("complete"):
        return _summary_from_manifest(output_uri, manifest)
    needs = check_cpus_left(
        config.embed.actors * config.embed.num_cpus, 1.0, "the embedding actor pool", "lower index.embed.num_cpus or actors",
        gpus=config.embed.actors * config.embed.num_gpus,
    )  # fmt: skip

    ray.data.DataContext.get_current().raise_original_map_exception = True
    timer = start_stage_timer()
    in_fs, in_root = filesystem(input_uri, storage)
    with plain_job_errors():
        dataset = _dataset_sources(in_fs, in_root, input_uri, storage)
        if dataset is not None and dataset[2] == 0:
            raise InputError(f"{input_uri}: the dataset has no accepted sources to index")
        stored = stored_embeddings(embeddings_uri, storage) if embeddings_uri else None
    write_json(out_fs, f"{root}/{MANIFEST_FILE}", {"complete": False, "fingerprint": fp, "input": input_uri, "started": started})
    corpus = dataset[0] if dataset else input_uri
    with awaiting_resources(needs, "the index build's embedding actors"), plain_job_errors():
        embed_started = time.perf_counter()
        listing = list_sources(corpus, data.source, storage)
        sink = _embed_sources(listing, dataset, stored, config, data, preset, native_size(spec), storage, out_fs, root, output_uri, timer)
        embed_seconds = time.perf_counter() - embed_started
    counts = count_output(out_fs, root, output_uri, storage, None)
    by_reason, rejected = counts.rejected_by_reason, counts.rejected
    found = table_dataset(out_fs, root, output_uri, "embeddings", ["source"], storage)
    if found is None or found[1] == 0:
        raise InputError(
            f"{input_uri}: nothing to index ({'an empty corpus' if not rejected else f'all {rejected} sources rejected: {by_reason}'})"
        )
    dim = load_clip_scorer(spec.clip_scorer, seed=spec.seed).dim if stored is not None else None
    index_started = time.perf_counter()
    with plain_job_errors():
        built = _build_in_a_task(output_uri, storage, config, found[1], dim, embeddings_uri)
    manifest = {
        "complete": True,
        "fingerprint": fp,
        "input": input_uri,
        "input_kind": "dataset" if dataset else "corpus",
        "corpus": corpus,
        "input_format": listing.format,
        "embeddings_from": embeddings_uri,
        "count": built["count"],
        "dim": built["dim"],
        "preset": preset,
        "clip": spec.clip_scorer.architecture,
        "reference_short_side": native_size(spec),
        "plan": built["plan"],
        "search": built["search"],
        "tuning": built["tuning"],
        "sources_in": int(sink.finished_before + sink.totals.get("sources", 0)),
        "embedded": built["count"],
        "rejected": rejected,
        "rejected_by_reason": by_reason,
        "seconds": {"embed": round(embed_seconds, 2), **built["seconds"], "index": round(time.perf_counter() - index_started, 2)},
        "peak_memory_bytes": built["peak_memory_bytes"],  # the larger stage-2 task's private memory (the driver holds no vector)
        "task_peak_memory_bytes": built["task_peak_memory_bytes"],
        "driver_peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "config": config.model_dump(mode="json"),
        "packages": {name: version(name) for name in ("faiss-cpu", "open_clip_torch", "torch", "ray", "numpy", "pyarrow")},
        "python": platform.python_version(),
        "started": started,
        "finished": time.time(),
    }
    if manifest["sources_in"] != manifest["embedded"] + rejected:
        raise RestorayError(
            f"{output_uri}: {manifest['sources_in']} sources read but {manifest['embedded']} embedded + {rejected} rejected; "
            "the output is inconsistent"
        )
    write_json(out_fs, f"{root}/{MANIFEST_FILE}", manifest)
    summary = _summary_from_manifest(output_uri, manifest, already_complete=False)
    summary.embedded_now = sink.totals.get("embedded", 0)
    return summary


def _embed_sources(
    listing, dataset, stored, config: IndexConfig, data: DataBuildConfig, preset, short_side, storage, fs, root, output_uri, timer
) -> IndexSink:
    """Stage 1: the sources read, embedded (or given their stored embedding) and written; the sink, its counts in
    `totals` and the number of sources an earlier run finished in `finished_before`."""
    from pipelines.stages.reference import ReferenceStage

    finished = finished_sources(fs, root, output_uri, storage, ("embeddings", "rejects"))
    if finished.count:
        log.info("resuming: %d sources already embedded or rejected", finished.count)
    notes = [part for part in (finished.notes, dataset[1] if dataset else None, stored[0] if stored else None) if part is not None]
    note_count = finished.count + (dataset[2] if dataset else 0) + (stored[1] if stored else 0)
    union = notes[0].union(*notes[1:]) if len(notes) > 1 else (notes[0] if notes else None)
    pending = with_known(listing, union, note_count, only_noted=dataset is not None)
    rows = source_rows(pending.units, pending.count, data, storage, only_noted=dataset is not None)
    rows = front_stages(rows.map_batches(read_stage(timer, "read", data)), data, timer)
    rows = rows.map_batches(
        ReferenceStage,
        fn_constructor_kwargs={
            "preset": preset,
            "config": config.embed,
            "short_side": short_side,
            "image_format": config.reference_format,
            "timer": timer,
        },
        batch_size=config.embed.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.embed.actors),
        num_cpus=config.embed.num_cpus,
        num_gpus=config.embed.num_gpus,
    )
    sink = IndexSink(output_uri, storage, config.max_rows_per_shard, faults.fault("index.fail_after_rows"))
    rows.write_datasink(sink)
    sink.finished_before = finished.count
    return sink


def _build_in_a_task(
    output_uri: str, storage: StorageConfig, config: IndexConfig, rows: int, expected_dim: int | None, embeddings_uri
) -> dict:
    """Stage 2 in two Ray tasks, so the driver never holds a vector and no process holds them all.
    1. `_assemble_task`: the embeddings (`rows` of them, a resumed run's repeats included) sorted by id (Ray Data's
       distributed sort; pyarrow in the task below SORT_IN_TASK_BYTES) and streamed into vectors.npy one batch at a
       time, one row per id, on whichever node it lands (0 CPUs of its own: Ray Data's tasks sort).
    2. `_build_task` on that node, its `memory` and `num_cpus` from the index plan (`max_calls=1`: a fresh worker, so
       its peak memory is the build's): train on a sample, add parts in Ray tasks that read their own slices of the
       file on the same node, merge, tune.
    The manifest's peak memory is the larger of the two tasks'."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    assemble = ray.remote(num_cpus=0, max_calls=1)(_measured).options(memory=ASSEMBLE_MEMORY)
    assembled = ray.get(assemble.remote(_assemble_task, output_uri, storage, rows, expected_dim, embeddings_uri))
    count, dim = assembled["count"], assembled["dim"]
    plan = faiss_index.plan_index(count, dim, int(config.max_memory), config.index_type, config.on_disk)
    memory = int(_build_memory(plan, count, dim, config))
    node = next(node for node in ray.nodes() if node["NodeID"] == assembled["node"])
    cpus = max(1, min(plan.build_cpus, int(node["Resources"].get("CPU", 1))))  # the plan's, but what the node has
    task = ray.remote(num_cpus=cpus, max_calls=1)(_measured).options(
        memory=memory, scheduling_strategy=NodeAffinitySchedulingStrategy(assembled["node"], soft=False)
    )
    built = ray.get(task.remote(_build_task, assembled["work"], output_uri, storage, config, count, dim))
    built["task_peak_memory_bytes"] = {"assemble": assembled["peak_memory_bytes"], "build": built["peak_memory_bytes"]}
    built["peak_memory_bytes"] = max(built["peak_memory_bytes"], assembled["peak_memory_bytes"])
    return built


def _measured(task: Callable[..., dict], *args) -> dict:
    """A stage-2 task's result with its private memory peak (runtime/memory.py: the object-store pages a task maps
    in to read blocks are the store's, not the task's)."""
    with PrivateMemoryPeak() as peak:
        result = task(*args)
    return {**result, "peak_memory_bytes": peak.bytes}


ASSEMBLE_MEMORY = 1 * 2**30  # Ray Data's iterator (a few batches) and the writer's block


def _build_memory(plan: faiss_index.IndexPlan, count: int, dim: int, config: IndexConfig) -> int:
    """What the build task holds at its peak: the training sample, the index twice (a part merged into it, or a
    flat/HNSW index beside the block being added), the tuning queries and a block read from the file."""
    block = min(count, config.add_batch) * 4 * dim
    return plan.train_size * 4 * dim + 2 * plan.resident_bytes + config.tuning_queries * 4 * dim + block + 512 * 2**20


def _assemble_task(output_uri: str, storage: StorageConfig, rows: int, expected_dim: int | None, embeddings_uri) -> dict:
    """vectors.npy: the embeddings in id order, one row per id (a source written twice by a resumed run counts
    once), streamed from Ray Data's sort; in the output directory, or a temporary one on this node for a remote
    output (the build task, placed on this node, uploads it)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # a worker's bars would reach the driver's console
    context.print_on_execution_start = False
    context.execution_options.preserve_order = True
    # Small blocks: the iterator holds a few of them at a time, so this process's memory does not grow with N.
    context.target_max_block_size = ASSEMBLE_BLOCK_BYTES
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    fs, root = filesystem(output_uri, storage)
    work = Path(tempfile.mkdtemp(prefix="restoray-index-")) if is_remote(output_uri) else Path(root)
    writer = faiss_index.VectorFileWriter(work / VECTORS_FILE)
    try:
        last = None
        for batch in _sorted_embeddings(fs, root, output_uri, storage, rows, expected_dim):
            ids = batch.column("id")
            if len(ids) == 0:
                continue
            previous = pa.concat_arrays([pa.array([last], pa.string()), ids.combine_chunks().slice(0, len(ids) - 1)])
            if last is not None and ids[0].as_py() < last:
                raise RestorayError(f"{output_uri}: the sorted embeddings arrived out of order at {ids[0].as_py()}")
            kept = batch.filter(pc.not_equal(ids, previous).fill_null(True))
            last = ids[-1].as_py()
            vectors = embedding_matrix(kept.column("embedding"))
            if expected_dim is not None and vectors.shape[1] != expected_dim:
                raise InputError(
                    f"--embeddings {embeddings_uri}: {vectors.shape[1]}-dim embeddings, but the preset's open-clip embeds {expected_dim}"
                )
            writer.write(vectors)
    except BaseException:
        writer.close()
        if is_remote(output_uri):
            shutil.rmtree(work, ignore_errors=True)
        raise
    writer.close()
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "work": str(work),
        "count": writer.rows,
        "dim": writer.dim,
    }


def _sorted_embeddings(fs, root: str, output_uri: str, storage: StorageConfig, rows: int, expected_dim: int | None) -> Iterator[pa.Table]:
    """embeddings/ (id, embedding) in id order, in batches: sorted by Ray Data across the cluster in small blocks, or,
    while the table is small (SORT_IN_TASK_BYTES), read and sorted here with pyarrow (Ray Data's sort costs seconds
    of start-up)."""
    width = 4 * (expected_dim or 1280)  # an upper bound per vector (ViT-bigG is 1280-d) when the width is not known yet
    if rows * width <= SORT_IN_TASK_BYTES:
        table = pa.concat_tables([read_parquet(fs, path, storage, ["id", "embedding"]) for path in parquet_files(fs, root, "embeddings")])
        yield from (pa.Table.from_batches([batch]) for batch in table.sort_by("id").to_batches(ASSEMBLE_BATCH))
        return
    embeddings, _ = table_dataset(fs, root, output_uri, "embeddings", ["id", "embedding"], storage)
    blocks = max(1, math.ceil(rows * width / ASSEMBLE_BLOCK_BYTES))
    ordered = embeddings.repartition(blocks).sort("id")  # the sort's output has as many blocks as its input
    yield from ordered.iter_batches(batch_format="pyarrow", batch_size=ASSEMBLE_BATCH, prefetch_batches=1)


ASSEMBLE_BATCH = 8192
SORT_IN_TASK_BYTES = 128 * 2**20
ASSEMBLE_BLOCK_BYTES = 16 * 2**20  # Ray Data's blocks in the sort (its output has as many blocks as its input)


def _build_task(work: str, output_uri: str, storage: StorageConfig, config: IndexConfig, count: int, dim: int) -> dict:
    from restoration.retrieval.index import faiss

    # faiss's OpenMP threads = the CPUs this task was given (Ray sets OMP_NUM_THREADS to them).
    faiss.omp_set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    fs, root = filesystem(output_uri, storage)
    work_dir = Path(work)
    try:
        plan, search, seconds = _build_faiss(work_dir, count, dim, config)
        if is_remote(output_uri):
            for path in sorted(work_dir.iterdir()):
                retrying(lambda path=path: fs.put_file(str(path), f"{root}/{path.name}"), f"{output_uri}/{path.name}", storage, "write")
    finally:
        if is_remote(output_uri):
            shutil.rmtree(work_dir, ignore_errors=True)
    return {
        "count": count,
        "dim": dim,
        "plan": plan.to_dict(),
        "search": {key: value for key, value in search.__dict__.items() if key != "evaluated"},
        "tuning": search.evaluated,
        "seconds": seconds,
    }


@ray.remote(num_cpus=1)
def _add_task(trained_empty: np.ndarray, vectors_file: str, start: int, stop: int) -> np.ndarray:
    """One part: rows start..stop of vectors.npy (read here, on the build's node) added to a copy of the empty index."""
    return faiss_index.add_part(trained_empty, faiss_index.vector_rows(Path(vectors_file), start, stop), start)


def windowed(submit: Callable[[int], Any], starts: Sequence[int], window: int, get: Callable[[Any], Any]) -> Iterator[Any]:
    """`get(submit(start))` for each start, in order, with at most `window` submissions outstanding: the oldest is
    collected before the next is submitted, so a part's result is released once it is merged (the index's parts
    never all sit in the object store at once)."""
    in_flight: deque = deque()
    for start in starts:
        if len(in_flight) >= window:
            yield get(in_flight.popleft())
        in_flight.append(submit(start))
    while in_flight:
        yield get(in_flight.popleft())


def _build_faiss(work: Path, count: int, dim: int, config: IndexConfig):
    """Train, add (in Ray tasks for IVF types), tune, from `work`/vectors.npy; writes index.faiss (+ .ivfdata) there.
    The training sample is the file's first rows: ids are sha256 digests of the source URIs, so id order is a
    random order of the corpus, and those rows are a uniform sample read in one slice. The tuning queries are drawn
    from the rows after it (held out)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from restoration.retrieval.index import faiss

    seconds: dict[str, float] = {}
    vectors_file = work / VECTORS_FILE
    plan = faiss_index.plan_index(count, dim, int(config.max_memory), config.index_type, config.on_disk)
    log.info("index: %s (%s) for %d vectors of %d dims", plan.type, plan.factory, count, dim)
    index = faiss_index.new_index(plan, dim, config.opq_iterations)
    clock = time.perf_counter()
    if plan.train_size:
        faiss_index.train_index(index, faiss_index.vector_rows(vectors_file, 0, plan.train_size))
    seconds["train"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    index_path = work / INDEX_FILE
    if plan.type in ("flat", "hnsw"):
        for start in range(0, count, config.add_batch):  # HNSW graphs do not merge: built in one process, block by block
            index.add(faiss_index.vector_rows(vectors_file, start, start + config.add_batch))
        faiss.write_index(index, str(index_path))
    else:
        empty = faiss_index.empty_copy(index)
        empty_ref = ray.put(empty)
        here = ray.get_runtime_context().get_node_id()
        node_cpus = next(node["Resources"].get("CPU", 2) for node in ray.nodes() if node["NodeID"] == here)
        add = _add_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))

        def submit(start: int):
            return add.remote(empty_ref, str(vectors_file), start, min(count, start + config.add_batch))

        parts = windowed(submit, range(0, count, config.add_batch), max(2, int(node_cpus)), ray.get)
        if plan.on_disk:
            part_files = []
            for number, serialized in enumerate(parts):
                part = work / f".part-{number}.faiss"
                faiss.write_index(faiss.deserialize_index(serialized), str(part))
                part_files.append(part)
            faiss_index.merge_parts_on_disk(empty, part_files, index_path)
            for part in part_files:
                part.unlink()
            index = faiss_index.read_index(index_path, on_disk=True)
        else:
            index = faiss.deserialize_index(empty)
            for serialized in parts:  # merged in order; each part freed after
                index.merge_from(faiss.deserialize_index(serialized), 0)
            faiss.write_index(index, str(index_path))
    seconds["add"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    rng = np.random.default_rng(0)
    held_out = count - plan.train_size
    queries_wanted = min(config.tuning_queries, count)
    first = plan.train_size if held_out >= queries_wanted else 0
    query_ids = np.sort(rng.choice(np.arange(first, count), queries_wanted, replace=False))
    mapped = np.load(vectors_file, mmap_mode="r")  # the re-ranking reads only the candidates' rows
    searcher = faiss_index.Searcher(index, mapped)
    queries = np.array(mapped[query_ids], dtype=np.float32)
    search = faiss_index.tune(searcher, queries, config.target_recall, query_ids=query_ids, vectors_file=vectors_file)
    seconds["tune"] = round(time.perf_counter() - clock, 2)
    if search.recall < config.target_recall:
        log.warning(
            "index: 10-recall@10 %.3f stays below index.target_recall %.2f at the largest settings", search.recall, config.target_recall
        )
    return plan, search, seconds


def _summary_from_manifest(output_uri: str, manifest: dict, already_complete: bool = True) -> IndexSummary:
    return IndexSummary(
        output=output_uri,
        sources_in=manifest["sources_in"],
        embedded=manifest["embedded"],
        rejected=manifest["rejected"],
        rejected_by_reason=manifest["rejected_by_reason"],
        plan=manifest["plan"],
        search=manifest["search"],
        seconds=manifest["seconds"],
        peak_memory_bytes=manifest["peak_memory_bytes"],
        already_complete=already_complete,
        embedded_now=0 if already_complete else manifest["embedded"],
    )
