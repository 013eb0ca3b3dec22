"""`restoray index build`: sources -> open-clip embeddings and a reference store (Ray Data), then a faiss index
(Ray tasks) tuned to a recall target.

Input: a corpus (any source `data build` reads) or a dataset `data build` wrote (then its accepted sources, each
once: shards hold several crops and variants per source; the sources are read from the dataset's corpus). Stage 1,
on Ray Data: read -> decode -> basic quality (the run's data.source/decode/quality) -> embed in an actor pool (or take
the embedding `data build` stored, `--embeddings`) and resize to the restoration model's size -> one sink writing
embeddings/, references/ and rejects/. It resumes as the dataset build does: sources already embedded or rejected
are skipped before they are read (pipelines/resume.py, pipelines/known_sources.py); a dataset's accepted sources and
the stored embeddings of `--embeddings` reach each read task joined onto its own units, never as a dict shipped to
every actor. Stage 2, in one Ray task sized from the index plan (`memory`): the vectors sorted by id into
vectors.npy, the index type from the count and index.max_memory, training on a sample, vectors added in parts by
Ray tasks (a bounded window) into copies of the trained empty index and merged (in memory, or on disk through
faiss.contrib.ondisk), search parameters tuned on held-out queries, then index.faiss; the driver writes
manifest.json. Layout: docs/architecture.md, "Reference index".
"""

from __future__ import annotations

import hashlib
import json
import logging
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
from restoration.dataset import EMBEDDING_SCHEMA, REJECT_SCHEMA, embedding_matrix, one_row_per_id
from restoration.errors import InputError, RestorayError
from restoration.retrieval import index as faiss_index
from restoration.retrieval.references import INDEX_FILE, MANIFEST_FILE, REFERENCE_ROW_GROUP, REFERENCE_SCHEMA, VECTORS_FILE
from runtime import faults
from runtime.config import StorageConfig
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
        "peak_memory_bytes": built["peak_memory_bytes"],  # the index task's (it holds the vectors; the driver never does)
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


def _read_embeddings(fs, root: str, storage: StorageConfig) -> pa.Table:
    files = parquet_files(fs, root, "embeddings")
    if not files:
        return EMBEDDING_SCHEMA.empty_table()
    return one_row_per_id(pa.concat_tables([read_parquet(fs, path, storage) for path in files]))


def _build_in_a_task(
    output_uri: str, storage: StorageConfig, config: IndexConfig, rows: int, expected_dim: int | None, embeddings_uri
) -> dict:
    """Stage 2 in one Ray task (`max_calls=1`: a fresh worker, so its peak memory is the build's) whose `memory`
    comes from the index plan: on a cluster it lands on a node that has it, and the driver never holds a vector."""
    plan = faiss_index.plan_index(rows, expected_dim or 1024, int(config.max_memory), config.index_type, config.on_disk)
    width = 4 * (expected_dim or 1280)  # an upper bound per vector (ViT-bigG is 1280-d) when the width is not known yet
    memory = int(3 * rows * width + plan.resident_bytes + 512 * 2**20)
    # The plan's CPUs, but never more than one node has: the task must fit somewhere.
    node_cpus = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
    cpus = max(1, min(plan.build_cpus, int(node_cpus)))
    task = ray.remote(num_cpus=cpus, max_calls=1)(_build_task).options(memory=memory)
    return ray.get(task.remote(output_uri, storage, config, expected_dim, embeddings_uri))


def _build_task(output_uri: str, storage: StorageConfig, config: IndexConfig, expected_dim: int | None, embeddings_uri) -> dict:
    from restoration.retrieval.index import faiss

    # faiss's OpenMP threads = the CPUs this task was given (Ray sets OMP_NUM_THREADS to them).
    faiss.omp_set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    fs, root = filesystem(output_uri, storage)
    embeddings = _read_embeddings(fs, root, storage)
    vectors = embedding_matrix(embeddings.column("embedding"))
    del embeddings
    if expected_dim is not None and vectors.shape[1] != expected_dim:
        raise InputError(
            f"--embeddings {embeddings_uri}: {vectors.shape[1]}-dim embeddings, but the preset's open-clip embeds {expected_dim}"
        )
    work = Path(tempfile.mkdtemp(prefix="restoray-index-")) if is_remote(output_uri) else Path(root)
    try:
        plan, search, seconds = _build_faiss(vectors, config, work)
        if is_remote(output_uri):
            for path in sorted(work.iterdir()):
                retrying(lambda path=path: fs.put_file(str(path), f"{root}/{path.name}"), f"{output_uri}/{path.name}", storage, "write")
    finally:
        if is_remote(output_uri):
            shutil.rmtree(work, ignore_errors=True)
    return {
        "count": len(vectors),
        "dim": int(vectors.shape[1]),
        "plan": plan.to_dict(),
        "search": {key: value for key, value in search.__dict__.items() if key != "evaluated"},
        "tuning": search.evaluated,
        "seconds": seconds,
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


@ray.remote(num_cpus=1)
def _add_task(trained_empty: np.ndarray, vectors: np.ndarray, first_id: int) -> np.ndarray:
    return faiss_index.add_part(trained_empty, vectors, first_id)


def windowed(submit: Callable[[int], Any], starts: Sequence[int], window: int, get: Callable[[Any], Any]) -> Iterator[Any]:
    """`get(submit(start))` for each start, in order, with at most `window` submissions outstanding: the oldest is
    collected before the next is submitted, so a part's input slice and result are released once it is merged (the
    index's parts never all sit in the object store at once)."""
    in_flight: deque = deque()
    for start in starts:
        if len(in_flight) >= window:
            yield get(in_flight.popleft())
        in_flight.append(submit(start))
    while in_flight:
        yield get(in_flight.popleft())


def _build_faiss(vectors: np.ndarray, config: IndexConfig, work: Path):
    """Train, add (in Ray tasks for IVF types), tune; writes vectors.npy and index.faiss (+ .ivfdata) into `work`."""
    from restoration.retrieval.index import faiss

    seconds: dict[str, float] = {}
    count, dim = vectors.shape
    np.save(work / VECTORS_FILE, vectors)
    mapped = np.load(work / VECTORS_FILE, mmap_mode="r")
    plan = faiss_index.plan_index(count, dim, int(config.max_memory), config.index_type, config.on_disk)
    log.info("index: %s (%s) for %d vectors of %d dims", plan.type, plan.factory, count, dim)
    rng = np.random.default_rng(0)
    index = faiss_index.new_index(plan, dim, config.opq_iterations)
    trained_positions = np.sort(rng.choice(count, plan.train_size, replace=False)) if plan.train_size else np.arange(0)
    clock = time.perf_counter()
    faiss_index.train_index(index, vectors[trained_positions] if plan.train_size else vectors)
    seconds["train"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    index_path = work / INDEX_FILE
    if plan.type in ("flat", "hnsw"):
        index.add(vectors)  # HNSW graphs do not merge: built in one process
        faiss.write_index(index, str(index_path))
    else:
        empty = faiss_index.empty_copy(index)
        empty_ref = ray.put(empty)
        window = max(2, int(ray.cluster_resources().get("CPU", 2)))

        def submit(start: int):
            return _add_task.remote(empty_ref, ray.put(np.ascontiguousarray(vectors[start : start + config.add_batch])), start)

        parts = windowed(submit, range(0, count, config.add_batch), window, ray.get)
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
    held_out = np.setdiff1d(np.arange(count), trained_positions)
    pool = held_out if len(held_out) >= min(config.tuning_queries, count) else np.arange(count)
    query_ids = np.sort(rng.choice(pool, min(config.tuning_queries, len(pool)), replace=False))
    searcher = faiss_index.Searcher(index, mapped)
    search = faiss_index.tune(searcher, np.asarray(mapped[query_ids]), config.target_recall, query_ids=query_ids)
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
