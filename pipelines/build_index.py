"""`restoray index build`: sources -> open-clip embeddings and a reference store (Ray Data), then a faiss index
(Ray tasks) tuned to a recall target.

Input: a corpus (any source `data build` reads) or a dataset `data build` wrote (then its accepted sources, each
once: shards hold several crops and variants per source; the sources are read from the dataset's corpus). Stage 1,
on Ray Data: read -> decode -> basic quality (the run's data.source/decode/quality) -> embed in an actor pool (or take
the embedding `data build` stored, `--embeddings`) and resize to the restoration model's size -> one sink writing
embeddings/, references/ and rejects/. It resumes as the dataset build does: sources already embedded or rejected
are skipped before decoding. Stage 2, on the driver and Ray tasks: the vectors sorted by id into vectors.npy, the
index type from the count and index.max_memory, training on a sample, vectors added in parts by Ray tasks into
copies of the trained empty index and merged (in memory, or on disk through faiss.contrib.ondisk), search parameters
tuned on held-out queries, then index.faiss and manifest.json. Layout: docs/architecture.md, "Reference index".
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
from ray.data import Datasink

from pipelines.build_dataset import (
    broadcast,
    front_stages,
    get_cached,
    parquet_files,
    plain_job_errors,
    read_json,
    read_parquet,
    read_stage,
    read_table,
    source_rows,
    write_json,
)
from pipelines.config import DataBuildConfig, IndexConfig
from pipelines.sink import block_rows, commit_table, reject_row
from pipelines.sources import list_units
from pipelines.timer import start_stage_timer
from restoration.dataset import EMBEDDING_SCHEMA, REJECT_SCHEMA, embedding_matrix, one_row_per_id
from restoration.errors import InputError, RestorayError
from restoration.retrieval import index as faiss_index
from restoration.retrieval.references import INDEX_FILE, MANIFEST_FILE, REFERENCE_ROW_GROUP, REFERENCE_SCHEMA, VECTORS_FILE
from runtime import faults
from runtime.config import StorageConfig
from runtime.resources import awaiting_resources, check_cpus_left
from runtime.storage import filesystem, is_remote, retrying

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


class IndexSink(Datasink):
    """embeddings/, references/ and rejects/ from one write task: references first, so a source counted as
    embedded (what resume reads) always has its stored image."""

    def __init__(self, output: str, storage: StorageConfig, max_rows: int, fail_after_rows: int = 0):
        self.output = output.rstrip("/")
        self.storage = storage
        self.max_rows = max_rows
        self.fail_after_rows = fail_after_rows  # runtime.faults' index.fail_after_rows (tests)

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
        return {"embedded": len(rows), "rejects": len(rejects)}


def _dataset_sources(fs, root: str, storage: StorageConfig) -> tuple[str, set[str]] | None:
    """(its corpus, its accepted sources) when `root` is a dataset `data build` wrote, else None."""
    manifest = read_json(fs, f"{root}/manifest.json", storage)
    if not manifest or not fs.exists(f"{root}/shards"):
        return None
    if not manifest.get("complete"):
        raise InputError(f"{root} is a dataset build that did not finish; complete it first (rerun `restoray data build`)")
    shards = read_table(fs, root, "shards", ["source", "kind"], storage)
    if shards is None:
        return manifest["input"], set()
    photos = shards.filter(pc.not_equal(shards.column("kind"), "negative"))  # generated negatives have no source
    return manifest["input"], set(photos.column("source").unique().to_pylist())


def stored_embeddings(uri: str, storage: StorageConfig) -> dict[str, bytes]:
    """{source: embedding bytes} from a dataset (its embeddings/) or an embeddings directory."""
    fs, root = filesystem(uri, storage)
    directory = root if not fs.exists(f"{root}/embeddings") else f"{root}/embeddings"
    files = [path for path in (fs.find(directory) if fs.exists(directory) else []) if path.endswith(".parquet")]
    files = [path for path in files if not path.rsplit("/", 1)[-1].startswith(".")]
    if not files:
        raise InputError(f"--embeddings {uri}: no embeddings parquet files there (a dataset built with data.embed.enabled has embeddings/)")
    table = pa.concat_tables([read_parquet(fs, path, storage, ["source", "embedding"]) for path in sorted(files)])
    return dict(zip(table.column("source").to_pylist(), table.column("embedding").to_pylist(), strict=True))


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
    from restoration.models.base import native_size
    from restoration.models.presets import load_preset

    started = time.time()
    storage = storage or StorageConfig()
    if input_uri.rstrip("/") == output_uri.rstrip("/"):
        raise InputError("--output must differ from --input")
    spec = load_preset(preset)
    in_fs, in_root = filesystem(input_uri, storage)
    dataset = _dataset_sources(in_fs, in_root, storage) if in_fs.exists(in_root) else None
    corpus, wanted = (dataset[0], dataset[1]) if dataset else (input_uri, None)
    if dataset is not None and not wanted:
        raise InputError(f"{input_uri}: the dataset has no accepted sources to index")
    units_format, units = list_units(corpus, data.source, storage)
    stored = stored_embeddings(embeddings_uri, storage) if embeddings_uri else None
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
    write_json(out_fs, f"{root}/{MANIFEST_FILE}", {"complete": False, "fingerprint": fp, "input": input_uri, "started": started})
    needs = check_cpus_left(
        config.embed.actors * config.embed.num_cpus, 1.0, "the embedding actor pool", "lower index.embed.num_cpus or actors",
        gpus=config.embed.actors * config.embed.num_gpus,
    )  # fmt: skip

    ray.data.DataContext.get_current().raise_original_map_exception = True
    timer = start_stage_timer()
    with awaiting_resources(needs, "the index build's embedding actors"), plain_job_errors():
        embed_started = time.perf_counter()
        _embed_sources(units, wanted, stored, config, data, preset, native_size(spec), storage, out_fs, root, output_uri, timer)
        embed_seconds = time.perf_counter() - embed_started
    totals = ray.get(timer.totals.remote())
    reads, embedded_now = totals.get("read", (0, 0.0))[0], totals.get("embed", (0, 0.0))[0]
    embeddings = _read_embeddings(out_fs, root, storage)
    rejects = read_table(out_fs, root, "rejects", ["source", "reason"], storage)
    by_reason: dict[str, int] = {}
    for reason in rejects.column("reason").to_pylist() if rejects is not None else []:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    rejected = sum(by_reason.values())
    if embeddings.num_rows == 0:
        raise InputError(
            f"{input_uri}: nothing to index ({'an empty corpus' if not rejected else f'all {rejected} sources rejected: {by_reason}'})"
        )
    vectors = embedding_matrix(embeddings.column("embedding"))
    from restoration.models.base import load_clip_scorer

    if stored is not None:
        dim = load_clip_scorer(spec.clip_scorer, seed=spec.seed).dim
        if vectors.shape[1] != dim:
            raise InputError(
                f"--embeddings {embeddings_uri}: {vectors.shape[1]}-dim embeddings, but preset {preset}'s open-clip embeds {dim}"
            )

    index_started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="restoray-index-")) if is_remote(output_uri) else Path(root)
    try:
        plan, search, seconds = _build_faiss(vectors, config, work)
        manifest = {
            "complete": True,
            "fingerprint": fp,
            "input": input_uri,
            "input_kind": "dataset" if dataset else "corpus",
            "corpus": corpus,
            "input_format": units_format,
            "embeddings_from": embeddings_uri,
            "count": len(vectors),
            "dim": int(vectors.shape[1]),
            "preset": preset,
            "clip": spec.clip_scorer.architecture,
            "reference_short_side": native_size(spec),
            "plan": plan.to_dict(),
            "search": {key: value for key, value in search.__dict__.items() if key != "evaluated"},
            "tuning": search.evaluated,
            "sources_in": int(reads),
            "embedded": len(vectors),
            "rejected": rejected,
            "rejected_by_reason": by_reason,
            "seconds": {"embed": round(embed_seconds, 2), **seconds, "index": round(time.perf_counter() - index_started, 2)},
            "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # the driver's (Linux: KiB)
            "config": config.model_dump(mode="json"),
            "packages": {name: version(name) for name in ("faiss-cpu", "open_clip_torch", "torch", "ray", "numpy", "pyarrow")},
            "python": platform.python_version(),
            "started": started,
            "finished": time.time(),
        }
        if is_remote(output_uri):
            for path in sorted(work.iterdir()):
                retrying(lambda path=path: out_fs.put_file(str(path), f"{root}/{path.name}"), f"{output_uri}/{path.name}", storage, "write")
    finally:
        if is_remote(output_uri):
            shutil.rmtree(work, ignore_errors=True)
    if manifest["sources_in"] != manifest["embedded"] + rejected:
        raise RestorayError(
            f"{output_uri}: {reads} sources read but {len(vectors)} embedded + {rejected} rejected; the output is inconsistent"
        )
    write_json(out_fs, f"{root}/{MANIFEST_FILE}", manifest)
    summary = _summary_from_manifest(output_uri, manifest, already_complete=False)
    summary.embedded_now = embedded_now
    return summary


def _embed_sources(
    units, wanted, stored, config: IndexConfig, data: DataBuildConfig, preset, short_side, storage, fs, root, output_uri, timer
):
    from pipelines.stages.reference import ReferenceStage

    done: set[str] = set()
    for table_name in ("embeddings", "rejects"):
        table = read_table(fs, root, table_name, ["source"], storage)
        if table is not None:
            done.update(table.column("source").to_pylist())
    if done:
        log.info("resuming: %d sources already embedded or rejected", len(done))
    skip = broadcast(done) if done else None
    rows = source_rows(units, data, storage)
    if wanted is not None:
        wanted_ref = broadcast(wanted)

        def only_wanted(batch: dict) -> dict:
            keep = get_cached(wanted_ref)
            mask = [source in keep for source in batch["source"]]
            return {key: [value for value, kept in zip(values, mask, strict=True) if kept] for key, values in batch.items()}

        rows = rows.map_batches(only_wanted)
    rows = front_stages(rows.map_batches(read_stage(timer, "read", skip, data)), data, timer)
    rows = rows.map_batches(
        ReferenceStage,
        fn_constructor_kwargs={
            "preset": preset,
            "config": config.embed,
            "short_side": short_side,
            "image_format": config.reference_format,
            "stored": broadcast(stored) if stored else None,
            "timer": timer,
        },
        batch_size=config.embed.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.embed.actors),
        num_cpus=config.embed.num_cpus,
        num_gpus=config.embed.num_gpus,
    )
    rows.write_datasink(IndexSink(output_uri, storage, config.max_rows_per_shard, faults.fault("index.fail_after_rows")))


def _read_embeddings(fs, root: str, storage: StorageConfig) -> pa.Table:
    files = parquet_files(fs, root, "embeddings")
    if not files:
        return EMBEDDING_SCHEMA.empty_table()
    return one_row_per_id(pa.concat_tables([read_parquet(fs, path, storage) for path in files]))


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
