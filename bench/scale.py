"""Corpus-scale builds: does anything in the driver grow with the corpus? (issue #26; run by hand)

    python bench/scale.py [--sizes 5000 20000 80000] [--full] [--semantic 200000] [--index 250000] [--skip-builds]

1. Dataset build on a synthetic corpus of small generated images (random 96-px crops of the bundled photos, JPEG
   q90), with planted exact copies (5%: the same bytes under another name) and near copies (5%: recompressed at q80,
   above the q60 floor, resized to 92 px and cropped by 2 px). Config: min_short_side 64, 64-px crops, one variant,
   model stages off, exact + perceptual dedup on. Each size runs in a fresh driver process (2 CPUs) that reports:
   its peak RSS, the object store's peak use (sampled), the driver's Python allocations (tracemalloc: the peak of
   all of them, Ray Data's per-block stats included, and what this repository's code still holds at the end, Ray's
   frames excluded; tracemalloc slows the driver, so images/s are lower than without it), images/s per core, and dedup
   precision / recall against the planted truth and against the single-process exact pass on the same scan.
2. Semantic dedup alone on synthetic 768-d embeddings (uniform on the sphere, 10% planted near copies: flat k-means
   splits a share of them across clusters, printed): wall time, peak RSS of the driver and of the Ray workers,
   recall against the exact pass on a 100k subset, and the multiply-adds against exact search.
3. Index stage 2 (sort into vectors.npy, train, add, merge, tune) with `--index-type ivf_pq` forced on N random
   768-d vectors: the driver's peak RSS and each stage-2 task's private memory peak (the sort-and-stream task's and
   the build task's, manifest `task_peak_memory_bytes`: object-store and file pages mapped in are not the task's)
   beside the vectors' size (N x 768 x 4 bytes): the sort task should stay flat, the build task grow only with the
   training sample (64 per inverted list).
`--full` adds 320k images, 1M embeddings and a 1M-vector index. Ratios are printed side by side from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_corpus(directory: Path, count: int, seed: int = 0) -> dict[str, str]:
    """`count` images; returns {copy file name: original file name} of the planted copies."""
    import cv2
    import numpy as np

    from restoration.images import encode_jpeg
    from restoray.samples import list_samples

    directory.mkdir(parents=True, exist_ok=True)
    photos = [s.load() for s in list_samples()]
    rng = np.random.default_rng(seed)
    planted: dict[str, str] = {}
    originals: list[tuple[str, np.ndarray, bytes]] = []
    for index in range(count):
        name = f"{rng.integers(10**8):08d}-{index:07d}.jpg"
        kind = rng.random()
        if originals and kind < 0.05:
            source_name, _, data = originals[int(rng.integers(len(originals)))]
            (directory / name).write_bytes(data)
            planted[name] = source_name
            continue
        if originals and kind < 0.10:
            source_name, pixels, _ = originals[int(rng.integers(len(originals)))]
            near = cv2.resize(pixels, (92, 92), interpolation=cv2.INTER_AREA)[2:, 2:]
            (directory / name).write_bytes(encode_jpeg(np.ascontiguousarray(near), 80))
            planted[name] = source_name
            continue
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        side = int(min(height, width) * rng.uniform(0.2, 0.5))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = cv2.resize(photo[top : top + side, left : left + side], (96, 96), interpolation=cv2.INTER_AREA)
        data = encode_jpeg(np.ascontiguousarray(crop), 90)
        (directory / name).write_bytes(data)
        if len(originals) < 5000:
            originals.append((name, crop, data))
    return planted


def bench_config():
    from pipelines.config import DataBuildConfig

    return DataBuildConfig.model_validate(
        {
            "quality": {"min_short_side": 64, "min_sharpness": None, "min_entropy": None},
            "crop": {"size": 64},
            "embed": {"enabled": False},
            "caption": {"mode": "keep-source"},
            "negatives": {"count": 0},
            "degrade": {"variants": 1, "image_format": "jpeg"},
            "write": {"max_rows_per_shard": 2000},
        }
    )


class Sampler:
    """Peak object-store use, sampled every `every` seconds (one cheap RPC: periodic tracemalloc snapshots would
    hold the GIL for seconds and stall the driver's streaming executor)."""

    def __init__(self, every: float = 2.0):
        self.every, self.store_peak = every, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def store_used(self) -> int:
        try:
            from ray._private.internal_api import get_memory_info_reply, get_state_from_address

            return int(get_memory_info_reply(get_state_from_address()).store_stats.object_store_bytes_used)
        except Exception:
            return 0

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.store_peak = max(self.store_peak, self.store_used())


def ours_traced() -> int:
    """Bytes still allocated through this repository's code (one snapshot, filtered: Ray's own frames excluded)."""
    import tracemalloc

    ours = [
        tracemalloc.Filter(True, f"{REPO}/{package}/*", all_frames=True) for package in ("pipelines", "restoration", "runtime", "restoray")
    ]
    snapshot = tracemalloc.take_snapshot().filter_traces(ours).filter_traces([tracemalloc.Filter(False, "*/ray/*")])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def child_build(corpus: Path, output: Path) -> dict:
    import resource
    import tracemalloc

    tracemalloc.start(6)  # frames enough to see whether our code made an allocation
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from pipelines.build_dataset import build_dataset

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = Sampler()
    sampler.thread.start()
    started = time.perf_counter()
    summary = build_dataset(str(corpus), str(output), bench_config(), "tiny")
    seconds = time.perf_counter() - started
    sampler.stop.set()
    sampler.thread.join()
    result = {
        "driver_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "driver_baseline": baseline,
        "store_peak": sampler.store_peak,
        "traced_peak": tracemalloc.get_traced_memory()[1],  # every Python allocation of the driver, Ray's included
        "ours_at_end": ours_traced(),
        "seconds": seconds,
        "sources": summary.sources_in,
        "rejected_by_reason": summary.rejected_by_reason,
    }
    ray.shutdown()
    return result


def _families(pairs) -> dict[str, str]:
    """Union-find over pairs of names: {name: its component's root}."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for a, b in pairs:
        parent[max(root(a), root(b))] = min(root(a), root(b))
    return {name: root(name) for name in list(parent)}


def dedup_quality(corpus: Path, output: Path, planted: dict[str, str]) -> dict:
    """Pairs, not names: a planted copy counts as found when it and its original end in one component of the build's
    (rejected, kept) edges (either may be the one rejected: the smaller URI is kept); a found edge is right when both
    ends belong to one planted family (an original and its copies)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.config import DedupConfig
    from pipelines.stages.dedup import find_duplicates

    rejects = pa.concat_tables([pq.read_table(p) for p in (output / "rejects").glob("*.parquet")]).to_pylist()
    found = [
        (Path(r["source"]).name, Path(r["detail"].rsplit(" ", 1)[-1]).name)
        for r in rejects
        if r["reason"] in ("duplicate", "near_duplicate")
    ]
    truth = _families(planted.items())
    components = _families(found)
    recalled = sum(1 for copy, original in planted.items() if copy in components and components.get(original) == components[copy])
    right = sum(1 for a, b in found if a in truth and truth.get(b) == truth[a])
    scan = pa.concat_tables([pq.read_table(p) for p in (output / "_work" / "scan").glob("*.parquet")])
    exact = find_duplicates(*(scan.column(c).to_pylist() for c in ("source", "sha256", "phash")), DedupConfig())
    decided = {r["source"]: (r["reason"], r["detail"]) for r in rejects if r["reason"] in ("duplicate", "near_duplicate")}
    return {
        "precision_planted": right / max(1, len(found)),
        "recall_planted": recalled / max(1, len(planted)),
        "equal_to_exact_pass": decided == exact,
    }


def bench_builds(sizes: list[int], work: Path) -> None:
    print(
        f"{'N':>8}{'wall s':>8}{'driver MB':>11}{'x 1st':>7}{'base MB':>9}{'traced MB':>11}{'ours MB':>9}{'store MB':>10}{'img/s/core':>12}"
        f"{'prec':>7}{'recall':>8}{'= exact':>9}"
    )
    first = None
    for size in sizes:
        corpus, output = work / f"corpus-{size}", work / f"out-{size}"
        planted_file = work / f"planted-{size}.json"
        if not planted_file.exists():
            planted_file.write_text(json.dumps(make_corpus(corpus, size)))
        planted = json.loads(planted_file.read_text())
        subprocess.run(["rm", "-rf", str(output)], check=True)
        child = subprocess.run(
            [sys.executable, __file__, "--child-build", str(corpus), str(output)], capture_output=True, text=True, cwd=REPO
        )
        if child.returncode:
            print(child.stderr[-3000:])
            raise SystemExit(f"build of {size} failed")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        quality = dedup_quality(corpus, output, planted)
        first = first or result
        print(
            f"{size:>8}{result['seconds']:>8.0f}{result['driver_peak'] / 2**20:>11.0f}"
            f"{result['driver_peak'] / first['driver_peak']:>7.2f}"
            f"{result['driver_baseline'] / 2**20:>9.0f}{result['traced_peak'] / 2**20:>11.1f}{result['ours_at_end'] / 2**20:>9.2f}"
            f"{result['store_peak'] / 2**20:>10.0f}"
            f"{size / result['seconds'] / 2:>12.1f}"
            f"{quality['precision_planted']:>7.3f}{quality['recall_planted']:>8.3f}{quality['equal_to_exact_pass']!s:>9}"
        )


def child_semantic(count: int, recall_subset: int) -> dict:
    import resource

    import pyarrow as pa

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from pipelines.config import DedupConfig
    from pipelines.semantic_dedup import cluster_count, find_semantic_duplicates
    from tests.integration.test_global_passes import planted_embeddings

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dim = 768
    parts, rows = [], 0
    for start in range(0, count, 100_000):
        vectors = planted_embeddings(min(100_000, count - start), dim, seed=start)
        names = [f"s3://c/{start + i:08d}" for i in range(len(vectors))]
        parts.append(ray.put(pa.table({"source": names, "embedding": [v.tobytes() for v in vectors]})))
        rows += len(vectors)
    embeddings = ray.data.from_arrow_refs(parts)
    config = DedupConfig()
    started = time.perf_counter()
    decisions = find_semantic_duplicates(embeddings, rows, config, partitions=None)
    found = {row["source"] for row in decisions.take_all()}
    seconds = time.perf_counter() - started
    # Recall against the exact pass on the first 100k (their pairs are planted within each 100k block).
    from pipelines.stages.dedup import find_clip_duplicates

    subset = planted_embeddings(min(100_000, count), dim, seed=0)[:recall_subset]  # block 0, as put above
    names = [f"s3://c/{i:08d}" for i in range(len(subset))]
    exact = set(find_clip_duplicates(names, subset, config.clip_threshold))
    clusters = cluster_count(config, rows)
    result = {
        "seconds": seconds,
        "recall": len(found & exact) / max(1, len(exact)),
        "recall_subset": len(subset),
        "clusters": clusters,
        "driver_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "workers_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        # Multiply-adds: exact N^2 d / 2 against assign N x k d (assignment) + sum of squared cluster sizes d / 2.
        "exact_madds": rows * rows * dim / 2,
        "semantic_madds": rows * clusters * dim + clusters * (rows * config.assign / clusters) ** 2 * dim / 2,
    }
    ray.shutdown()
    return result


def child_make_embeddings(count: int, work: Path) -> dict:
    """An index build's embeddings/ table of `count` random unit 768-d vectors (its own process: the build's driver
    is measured without it)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from restoration.dataset import source_id

    out = work / f"index-{count}"
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for start in range(0, count, 50_000):
        vectors = rng.standard_normal((min(50_000, count - start), 768)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        sources = [f"s{start + i:08d}" for i in range(len(vectors))]
        table = pa.table({"id": [source_id(s) for s in sources], "source": sources, "embedding": [v.tobytes() for v in vectors]})
        pq.write_table(table, out / "embeddings" / f"part-{start:08d}.parquet")
    return {"written": count}


def child_index(count: int, work: Path) -> dict:
    import resource

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from pipelines.build_index import _build_in_a_task
    from pipelines.config import IndexConfig

    out = work / f"index-{count}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = IndexConfig.model_validate({"index_type": "ivf_pq", "tuning_queries": 200})
    started = time.perf_counter()
    from runtime.config import StorageConfig

    built = _build_in_a_task(str(out), StorageConfig(), config, count, 768, None)
    result = {
        "seconds": time.perf_counter() - started,
        "driver_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "driver_baseline": baseline,
        "assemble_peak": built["task_peak_memory_bytes"]["assemble"],
        "task_peak": built["task_peak_memory_bytes"]["build"],
        "recall": built["search"]["recall"],
    }
    ray.shutdown()
    return result


def run_child(arguments: list[str]) -> dict:
    child = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, cwd=REPO)
    if child.returncode:
        print(child.stderr[-3000:])
        raise SystemExit(f"{' '.join(arguments)} failed")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 80000])
    parser.add_argument("--semantic", type=int, nargs="*", default=[200_000])
    parser.add_argument("--index", type=int, nargs="*", default=[250_000])
    parser.add_argument("--full", action="store_true", help="add 320k images, 1M embeddings, a 1M-vector index")
    parser.add_argument("--skip-builds", action="store_true")
    parser.add_argument("--recall-subset", type=int, default=25_000, help="embeddings the exact pass checks recall on (100k: minutes)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "restoray-bench-scale")
    parser.add_argument("--child-build", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-semantic", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-make-embeddings", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_build:
        print(json.dumps(child_build(*args.child_build)))
        return
    if args.child_semantic:
        print(json.dumps(child_semantic(args.child_semantic, args.recall_subset)))
        return
    if args.child_make_embeddings:
        print(json.dumps(child_make_embeddings(args.child_make_embeddings, args.work)))
        return
    if args.child_index:
        print(json.dumps(child_index(args.child_index, args.work)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if args.full:
        args.sizes, args.semantic, args.index = [*args.sizes, 320_000], [*args.semantic, 1_000_000], [*args.index, 1_000_000]
        args.recall_subset = 100_000
    if not args.skip_builds:
        print("dataset build (2 CPUs, model stages off)")
        bench_builds(args.sizes, args.work)
    if args.semantic:
        print(f"\nsemantic dedup, 768-d planted embeddings (data.dedup defaults; recall on the first {args.recall_subset})")
        print(f"{'N':>9}{'clusters':>9}{'wall s':>8}{'driver MB':>11}{'workers MB':>12}{'recall':>8}{'madds vs exact':>16}")
        for count in args.semantic:
            r = run_child(["--child-semantic", str(count), "--recall-subset", str(args.recall_subset)])
            print(
                f"{count:>9}{r['clusters']:>9}{r['seconds']:>8.1f}{r['driver_peak'] / 2**20:>11.0f}{r['workers_peak'] / 2**20:>12.0f}"
                f"{r['recall']:>8.4f}{r['exact_madds'] / r['semantic_madds']:>15.1f}x"
            )
    if args.index:
        print("\nindex stage 2, ivf_pq forced, 768-d")
        print(
            f"{'N':>9}{'wall s':>8}{'driver MB':>11}{'x 1st':>7}{'base MB':>9}{'sort MB':>9}{'build MB':>10}{'vectors MB':>12}{'recall':>8}"
        )
        first = None
        for count in args.index:
            run_child(["--child-make-embeddings", str(count), "--work", str(args.work)])
            r = run_child(["--child-index", str(count), "--work", str(args.work)])
            first = first or r
            print(
                f"{count:>9}{r['seconds']:>8.1f}{r['driver_peak'] / 2**20:>11.0f}{r['driver_peak'] / first['driver_peak']:>7.2f}"
                f"{r['driver_baseline'] / 2**20:>9.0f}{r['assemble_peak'] / 2**20:>9.0f}{r['task_peak'] / 2**20:>10.0f}"
                f"{count * 768 * 4 / 2**20:>12.0f}{r['recall']:>8.3f}"
            )


if __name__ == "__main__":
    main()
