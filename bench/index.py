"""Reference-index benchmark, run by hand; prints tables measured side by side in one run.

1. faiss types on synthetic clustered float32 vectors (default 1M x 768-d), each built one after another and freed,
   faiss pinned to one thread: build seconds, peak memory of the build, resident size, tuned search parameters,
   10-recall@10 and queries/s against exact flat search on the same held-out queries (goal: >= 20x at >= 0.95).
2. The type chosen with index.max_memory = 1 GB: it must fit resident and reach the target with exact re-ranking
   from the memory-mapped vectors.
3. The embedding stage: open-clip ViT-B-32 at 224 px with random weights (no download), images/s on one core inside
   Ray Data (the index build's ReferenceStage on one actor with one CPU) against the same model called in one process
   with one thread (goal: Ray overhead <= 20%).

    .venv/bin/python bench/index.py                       # the full run (1M vectors: IVF training takes minutes)
    .venv/bin/python bench/index.py --count 100000 --embed-images 128
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss
import numpy as np
import psutil

from restoration.retrieval import index as faiss_index

GB = 10**9


class PeakMemory:
    """Peak resident memory of this process while the block runs, sampled every 50 ms."""

    def __enter__(self):
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def added(self) -> int:
        return self.peak - self.base


def clustered(count: int, dim: int, clusters: int, seed: int, block: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, block):
        stop = min(count, start + block)
        chunk = centres[rng.integers(0, clusters, stop - start)] + 0.8 * rng.normal(size=(stop - start, dim)).astype(np.float32)
        out[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def build(plan: faiss_index.IndexPlan, vectors: np.ndarray, work: Path, add_batch: int = 100_000):
    """The index build's stage 2 in one process (the parts the Ray tasks add are added here one after another)."""
    index = faiss_index.new_index(plan, vectors.shape[1])
    rng = np.random.default_rng(0)
    sample = vectors[np.sort(rng.choice(len(vectors), plan.train_size, replace=False))] if plan.train_size else vectors
    faiss_index.train_index(index, sample)
    del sample
    if plan.type in ("flat", "hnsw"):
        index.add(vectors)
        return index
    empty = faiss_index.empty_copy(index)
    if plan.on_disk:
        parts = []
        for number, start in enumerate(range(0, len(vectors), add_batch)):
            part = work / f"part-{number}.faiss"
            faiss.write_index(faiss.deserialize_index(faiss_index.add_part(empty, vectors[start : start + add_batch], start)), str(part))
            parts.append(part)
        faiss_index.merge_parts_on_disk(empty, parts, work / "index.faiss")
        return faiss_index.read_index(work / "index.faiss", on_disk=True)
    index = faiss.deserialize_index(empty)
    for start in range(0, len(vectors), add_batch):
        index.merge_from(faiss.deserialize_index(faiss_index.add_part(empty, vectors[start : start + add_batch], start)), 0)
    return index


def index_rows(args) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        return _index_rows(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # 1M x 768 vectors are 3 GB


def _index_rows(args, work: Path) -> list[dict]:
    faiss.omp_set_num_threads(1)
    vectors = clustered(args.count, args.dim, args.clusters, seed=0)
    np.save(work / "vectors.npy", vectors)
    del vectors
    mapped = np.load(work / "vectors.npy", mmap_mode="r")
    queries = clustered(args.queries, args.dim, args.clusters, seed=1)  # held out: not in the index
    rows = []
    # Forced types get the same 1 GB budget (it sizes the PQ codes); HNSW and IVF-Flat hold the full vectors anyway.
    plans = [(name, faiss_index.plan_index(args.count, args.dim, max(GB, 2 * 4 * args.dim * args.count), name)) for name in args.types]
    if not args.no_auto:
        plans.append(("auto @ 1 GB", faiss_index.plan_index(args.count, args.dim, GB)))
    exact_qps = None
    for label, plan in plans:
        same = next((row for row in rows if row["plan"] == plan.factory + str(plan.on_disk)), None)
        if same is not None:  # the budget chose a type already built above: the same index, measured once
            rows.append({**same, "type": label})
            continue
        gc.collect()
        print(f"building {label}: {plan.factory} (nlist {plan.nlist}, train {plan.train_size}) ...", flush=True)
        started = time.perf_counter()
        with PeakMemory() as memory:
            index = build(plan, np.asarray(mapped) if plan.type in ("flat", "hnsw") else mapped, work)
        seconds = time.perf_counter() - started
        searcher = faiss_index.Searcher(index, mapped)
        tuned = faiss_index.tune(searcher, queries, args.target)
        exact_qps = exact_qps or tuned.exact_qps
        rows.append(
            {
                "type": label,
                "plan": plan.factory + str(plan.on_disk),
                "factory": plan.factory + (" (on disk)" if plan.on_disk else ""),
                "nlist": plan.nlist,
                "build_s": seconds,
                "peak_mb": memory.added / 1e6,
                "resident_mb": plan.resident_bytes / 1e6,
                "params": f"{tuned.faiss or 'exact'} rerank x{tuned.rerank}",
                "recall": tuned.recall,
                "qps": tuned.qps,
                "vs_exact": tuned.qps / exact_qps,
            }
        )
        print(f"  {rows[-1]}", flush=True)
        del index, searcher
    return rows


def embedding_rows(args) -> list[dict]:
    """ReferenceStage in Ray Data on one 1-CPU actor vs the same model in one process on one thread."""
    import tomllib

    import open_clip
    import ray
    import tomli_w
    import torch
    from PIL import Image

    from restoration.models.base import load_clip_scorer
    from restoration.models.presets import PRESET_DIR

    preset = tomllib.loads((PRESET_DIR / "tiny.toml").read_text(encoding="utf-8"))
    preset["name"] = "bench-vit-b-32"
    preset["clip_scorer"] = {"architecture": "restoray-bench-vit-b-32", "config": open_clip.get_model_config("ViT-B-32")}
    preset_path = Path(tempfile.mkdtemp(prefix="bench-preset-")) / "bench-vit-b-32.toml"
    preset_path.write_text(tomli_w.dumps(preset), encoding="utf-8")

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(args.embed_images)]
    from restoration.models.presets import load_preset

    spec = load_preset(str(preset_path))
    torch.set_num_threads(1)
    scorer = load_clip_scorer(spec.clip_scorer, seed=spec.seed)
    # The same measure as in Ray: batches of 16, from the end of the first to the end of the last.
    ends = []
    for start_row in range(0, len(images), 16):
        scorer.embed_images([Image.fromarray(image) for image in images[start_row : start_row + 16]])
        ends.append(time.perf_counter())
    plain = (len(images) - 16) / (ends[-1] - ends[0])
    del scorer

    import logging

    from pipelines.config import IndexEmbedConfig
    from pipelines.stages.reference import ReferenceStage

    # Every batch reported on its own (pipelines.timer batches them by default): the stamps time each batch.
    env = {"env_vars": {"RESTORAY_TIMER_FLUSH_S": "0"}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, runtime_env=env)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False

    @ray.remote(num_cpus=0)
    class Stamps:
        """Stands in for the build's StageTimer: when each batch finished, and its rows."""

        def __init__(self):
            self.stamps = []

        def add(self, counts: dict) -> None:
            self.stamps.append((time.perf_counter(), sum(rows for rows, _ in counts.values())))

        def count_reads(self, *args):
            return 0, 0

        def all(self) -> list:
            return self.stamps

    rows = [{"source": f"bench/{i}.png", "pixels": image.tobytes(), "height": 256, "width": 256} for i, image in enumerate(images)]
    stamps = Stamps.remote()
    embed = ray.data.from_items(rows, override_num_blocks=max(1, len(images) // 16)).map_batches(
        ReferenceStage,
        fn_constructor_kwargs={
            "preset": str(preset_path),
            "config": IndexEmbedConfig(num_cpus=1),
            "short_side": 64,
            "image_format": "jpeg",
            "timer": stamps,
        },
        batch_size=16,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    started = time.perf_counter()
    assert embed.count() == len(images)
    wall = len(images) / (time.perf_counter() - started)
    # Steady state: from the end of the first batch (pool started, model loaded, first call's set-up paid) to the end
    # of the last, in wall time: the gaps between batches (scheduling, block transfer, the sink side) count.
    done = sorted(ray.get(stamps.all.remote()))
    in_ray = sum(count for _, count in done[1:]) / (done[-1][0] - done[0][0])
    ray.shutdown()
    return [
        {"where": "one process, 1 thread", "images_per_s": plain, "ratio": 1.0},
        {"where": "Ray Data ReferenceStage, 1 actor x 1 CPU", "images_per_s": in_ray, "ratio": in_ray / plain},
        {
            "where": "  the same, wall time incl. actor start",
            "images_per_s": wall,
            "ratio": wall / plain,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--types", default="flat,hnsw,ivf,ivf_pq")
    parser.add_argument("--embed-images", type=int, default=256)
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument("--no-auto", action="store_true", help="leave out the row the 1 GB budget chooses")
    args = parser.parse_args()
    args.types = [name for name in args.types.split(",") if name]

    embed = [] if args.skip_embedding else embedding_rows(args)  # first: before faiss's OpenMP threads exist in this process
    rows = index_rows(args)
    print(f"\n{args.count:,} clustered {args.dim}-d vectors, {args.queries} held-out queries, one thread, target {args.target}")
    header = f"{'type':<12} {'factory':<36} {'nlist':>6} {'build s':>8} {'peak MB':>8} {'resident MB':>11} {'params':<38}"
    print(header + f" {'recall':>6} {'q/s':>8} {'x exact':>7}")
    for row in rows:
        print(
            f"{row['type']:<12} {row['factory']:<36} {row['nlist']:>6} {row['build_s']:>8.1f} {row['peak_mb']:>8.0f} "
            f"{row['resident_mb']:>11.0f} {row['params']:<38} {row['recall']:>6.3f} {row['qps']:>8.0f} {row['vs_exact']:>7.1f}"
        )
    auto = rows[-1] if not args.no_auto else None
    fits = auto is not None and auto["resident_mb"] * 1e6 <= GB and auto["recall"] >= args.target
    print(
        f"goal QPS >= 20x exact at recall >= {args.target}: "
        + ", ".join(
            f"{r['type']} {'met' if r['recall'] >= args.target and r['vs_exact'] >= 20 else 'not met'}" for r in rows if r["type"] != "flat"
        )
    )
    if auto is not None:
        print(f"goal 1 GB budget fits resident and reaches the target: {'met' if fits else 'not met'}")
    if embed:
        print(f"\nembedding, open-clip ViT-B-32 (random weights) at 224 px, {args.embed_images} images of 256 px")
        for row in embed:
            print(f"{row['where']:<42} {row['images_per_s']:>8.1f} images/s  {row['ratio']:>5.2f}x")
        overhead = 1 - embed[1]["ratio"]
        print(f"goal Ray overhead <= 20%: {'met' if overhead <= 0.2 else 'not met'} ({overhead:.0%})")


if __name__ == "__main__":
    main()
