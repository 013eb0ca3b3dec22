"""`restoray data build`: corpus -> training shards, on Ray Data.

Stages (DESIGN.md's order): read -> decode -> basic quality -> dedup -> CLIP embedding (aesthetic) -> caption ->
image-text score -> crop -> degrade -> write (shards and rejects through one sink) -> manifest.

Dedup needs every image's hashes before it can decide, so when it is on a first, lighter pass (read, decode,
quality, hashes) collects (source, sha256, phash) for the images that pass quality; the driver groups them and
the main pass rejects the duplicates at the dedup stage. The scan is cached in the output, so a resumed build
does not repeat it.

Resume: committed shard and reject files name their sources. A re-run skips sources already complete (all
variants written, or rejected) before decoding them, skips sample ids already written, and a re-run of a
completed build with the same input and config is a no-op that says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines.config import DataBuildConfig
from pipelines.rows import batch_of, is_rejected, row_stage, rows_of
from pipelines.sink import ShardSink
from pipelines.sources import filesystem, list_units, read_units
from pipelines.stages.crop import crop_row
from pipelines.stages.decode import decode_row
from pipelines.stages.dedup import dedup_row, find_duplicates, hashes_row
from pipelines.stages.degrade import DegradeStage
from pipelines.stages.quality import quality_row
from pipelines.timer import StageTimer
from restoration.degradations import REGISTRY
from restoration.errors import InputError, RestorayError

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
        lines.append(
            f"  samples written   {self.samples_written:>8}  " + ", ".join(f"{k} {v}" for k, v in sorted(self.samples_by_kind.items()))
        )
        if self.stage_rows_per_second:
            lines.append("  rows/s per busy core, by stage:")
            lines += [f"    {stage:<16}{rate:>8.1f}" for stage, rate in self.stage_rows_per_second.items()]
        if not self.already_complete:
            lines.append(f"  wall time         {self.seconds:>8.1f} s")
        return "\n".join(lines)


def storage_options(endpoint_url: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}}
    if endpoint_url:
        options["client_kwargs"] = {"endpoint_url": endpoint_url}
    return options


def fingerprint(input_uri: str, config: DataBuildConfig, preset: str) -> str:
    payload = json.dumps({"input": input_uri, "config": config.model_dump(mode="json"), "preset": preset}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _read_json(fs, path: str) -> dict | None:
    try:
        if fs.exists(path):
            with fs.open(path, "rb") as handle:
                return json.loads(handle.read())
    except (OSError, json.JSONDecodeError):
        return None
    return None


def _read_table(fs, root: str, name: str, columns: list[str]) -> pa.Table | None:
    directory = f"{root}/{name}"
    if not fs.exists(directory):
        return None
    files = sorted(p for p in fs.find(directory) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("."))
    if not files:
        return None
    tables = []
    for path in files:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle, columns=columns))
    return pa.concat_tables(tables)


def _existing_output(fs, root: str, variants: int) -> tuple[set[str], frozenset[str]]:
    """(sources already complete, sample ids of sources written only in part)."""
    done: set[str] = set()
    partial_ids: set[str] = set()
    rejects = _read_table(fs, root, "rejects", ["source"])
    if rejects is not None:
        done.update(rejects.column("source").to_pylist())
    shards = _read_table(fs, root, "shards", ["source", "id"])
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


def _get_cached(ref_holder: dict) -> Any:
    key = ref_holder["key"]
    if key not in _object_cache:
        _object_cache[key] = ray.get(ref_holder["ref"])
    return _object_cache[key]


def _broadcast(value: Any) -> dict:
    """Put a read-only value in the object store once; tasks fetch it once per worker process."""
    return {"key": f"{id(value)}-{time.monotonic_ns()}", "ref": ray.put(value)}


def _read_stage(timer, label: str, skip: dict | None):
    def udf(batch: dict) -> dict:
        rows = rows_of(batch)
        done = _get_cached(skip) if skip else set()
        kept = [row for row in rows if row["source"] not in done]
        ray.get(timer.add.remote(label, len(rows), 0.0))  # counted, not timed: reading happens in read_units
        if done:
            ray.get(timer.add.remote("skipped (already written)", len(rows) - len(kept), 0.0))
        return batch_of(kept)

    return udf


def _source_rows(units: list[dict], config: DataBuildConfig, options: dict) -> ray.data.Dataset:
    blocks = max(1, min(len(units), config.source.read_parallelism * 4))
    return ray.data.from_items(units, override_num_blocks=blocks).map_batches(
        read_units, batch_size=1, fn_kwargs={"config": config.source, "storage_options": options}
    )


def _front_stages(dataset: ray.data.Dataset, config: DataBuildConfig, timer, prefix: str = "") -> ray.data.Dataset:
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


def _scan_duplicates(units, config: DataBuildConfig, options: dict, fs, root: str, fp: str, timer) -> dict[str, tuple[str, str]]:
    cached = _read_json(fs, f"{root}/_work/scan.json")
    if cached and cached.get("fingerprint") == fp and fs.exists(f"{root}/{SCAN}"):
        with fs.open(f"{root}/{SCAN}", "rb") as handle:
            table = pq.read_table(handle)
        log.info("dedup: reusing the hash scan of an earlier run (%d images)", table.num_rows)
    else:
        scan = _front_stages(_source_rows(units, config, options).map_batches(_read_stage(timer, "scan", None)), config, timer, "scan: ")

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
    return find_duplicates(
        table.column("source").to_pylist(), table.column("sha256").to_pylist(), table.column("phash").to_pylist(), config.dedup
    )


_SCAN_SCHEMA = pa.schema([("source", pa.string()), ("sha256", pa.string()), ("phash", pa.int64())])


def build_dataset(
    input_uri: str,
    output_uri: str,
    config: DataBuildConfig,
    preset: str,
    s3_endpoint_url: str | None = None,
    *,
    listed: tuple[str, list[dict]] | None = None,
    fail_after_rows: int = 0,
) -> BuildSummary:
    """Run the build; Ray must be initialised by the caller. Raises InputError for unusable inputs/outputs.

    `listed` is `list_units`' result when the caller already listed the input (listing a large S3 prefix is slow).
    `fail_after_rows` is a test hook: each write task raises once it has committed that many rows.
    """
    started = time.time()
    options = storage_options(s3_endpoint_url)
    if input_uri.rstrip("/") == output_uri.rstrip("/"):
        raise InputError("--output must differ from --input")
    units_format, units = listed if listed is not None else list_units(input_uri, config.source, options)
    out_fs, root = filesystem(output_uri, options)
    try:
        out_fs.makedirs(root, exist_ok=True)
    except Exception as err:
        raise InputError(f"cannot write to output {output_uri}: {type(err).__name__}: {err}") from err
    fp = fingerprint(input_uri, config, preset)
    manifest = _read_json(out_fs, f"{root}/{MANIFEST}")
    if manifest and manifest.get("complete") and manifest.get("fingerprint") == fp:
        return _summary_from_manifest(output_uri, manifest)
    if manifest and manifest.get("fingerprint") not in (None, fp):
        raise InputError(f"{output_uri} holds a build of another input or config; choose a new --output or remove it")
    _write_json(out_fs, f"{root}/{MANIFEST}", {"complete": False, "fingerprint": fp, "input": input_uri, "started": started})

    _check_resources(config)
    timer = StageTimer.remote()
    decisions: dict[str, tuple[str, str]] = {}
    if config.dedup.exact or config.dedup.perceptual:
        decisions = _scan_duplicates(units, config, options, out_fs, root, fp, timer)
    done, partial_ids = _existing_output(out_fs, root, config.degrade.variants)
    if done or partial_ids:
        log.info("resuming: %d sources already written, %d sample ids of partly written sources", len(done), len(partial_ids))

    rows = _source_rows(units, config, options).map_batches(_read_stage(timer, "read", _broadcast(done) if done else None))
    rows = _front_stages(rows, config, timer)
    if decisions:
        decisions_ref = _broadcast(decisions)
        rows = rows.map_batches(row_stage("dedup", lambda row: dedup_row(row, _get_cached(decisions_ref)), timer), batch_size=8)
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
    samples.write_datasink(ShardSink(output_uri, options, config.write.max_rows_per_shard, partial_ids, fail_after_rows))

    summary = _summarise(out_fs, root, output_uri, ray.get(timer.totals.remote()), started)
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
        "config": config.model_dump(mode="json"),
        "preset": preset,
        "degradation_types": {str(k): v for k, v in REGISTRY.id_to_name().items()},
        "stage_rows_per_second": summary.stage_rows_per_second,
        "packages": {name: version(name) for name in ("ray", "numpy", "opencv-python-headless", "pillow", "torch", "pyarrow")},
        "python": platform.python_version(),
        "started": started,
        "finished": time.time(),
    }
    _write_json(out_fs, f"{root}/{MANIFEST}", manifest)
    return summary


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


def _check_resources(config: DataBuildConfig) -> None:
    """Actor pools hold their CPUs for the whole run; the task stages need at least one CPU beside them."""
    reserved = 0.0
    if config.embed.enabled:
        reserved += 2 * config.embed.actors * config.embed.num_cpus  # embedding and image-text score pools
    if config.caption.mode != "keep-source":
        reserved += config.caption.actors * config.caption.num_cpus
    available = ray.cluster_resources().get("CPU", 0.0)
    if available - reserved < 1.0:
        raise InputError(
            f"the model stages' actor pools reserve {reserved:g} of the cluster's {available:g} CPUs, leaving less than one "
            "for the read/decode/degrade tasks; lower data.embed.num_cpus / data.caption.num_cpus or their actors, or add CPUs"
        )


def _summarise(fs, root: str, output_uri: str, totals: dict, started: float) -> BuildSummary:
    shards = _read_table(fs, root, "shards", ["source", "id", "kind"])
    rejects = _read_table(fs, root, "rejects", ["source", "reason"])
    accepted = set(shards.column("source").to_pylist()) if shards is not None else set()
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
        already_complete=True,
    )


def _write_json(fs, path: str, payload: dict) -> None:
    partial = f"{path}.partial"
    with fs.open(partial, "wb") as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=True).encode())
    fs.mv(partial, path)
