"""Semantic dedup: CLIP near-duplicates among the accepted sources, as Ray tasks (NeMo Curator's method: k-means on
the embeddings, pairwise cosine only inside each cluster).

1. k-means (faiss, spherical) on a random sample of at most `data.dedup.kmeans_sample` embeddings, in one Ray task
   whose `memory` is sized from the sample;
2. each embedding joins its `data.dedup.assign` nearest centroids (one row per cluster it joins): a pair split by a
   cluster boundary still meets in a cluster they share, which flat (single) assignment misses;
3. inside each cluster (`groupby("cluster")`), cosines computed a block of rows at a time (a block x cluster matrix,
   so a large cluster never holds its full square) and only the pairs at or above `data.dedup.clip_threshold` leave
   the task: candidate pairs never become rows;
4. one task over the few match edges: in URI order, a source with a match among the kept sources of smaller URI is
   dropped and names the smallest of them, as the exact pass (`pipelines.stages.dedup.find_clip_duplicates`) does.
The exact pass compares every pair (N^2 d multiply-adds); this compares N x assign x cluster size x d. Recall
against the exact pass is measured in tests/integration (planted embeddings) and by bench/scale.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from pipelines.config import DedupConfig
from pipelines.rows import concat_blocks

BLOCK = 1024
EDGE_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("cosine", pa.float32())])
DECISION_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
MAX_CLUSTERS = 65_536


def cluster_count(config: DedupConfig, rows: int) -> int:
    if config.clusters != "auto":
        return max(1, min(config.clusters, rows))
    return max(1, min(MAX_CLUSTERS, rows // 1000))


def vectors_of(batch: pa.Table) -> np.ndarray:
    column = batch.column("embedding").combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0), np.float32)
    values = np.frombuffer(column.buffers()[2], dtype=np.uint8)  # binary: validity, offsets, data
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
    width = int(offsets[1] - offsets[0])
    data = values[offsets[0] : offsets[-1]]
    return np.ascontiguousarray(data.view("<f4").reshape(len(column), width // 4))


def _train(sample: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    from restoration.retrieval.index import faiss

    clusters = min(clusters, len(sample))
    if clusters == 1:
        centroid = sample.mean(axis=0, keepdims=True)
        return centroid / max(np.linalg.norm(centroid), 1e-12)
    kmeans = faiss.Kmeans(sample.shape[1], clusters, niter=20, spherical=True, seed=seed, verbose=False, min_points_per_centroid=1)
    kmeans.train(sample)
    return kmeans.centroids


@ray.remote(num_cpus=1)
def _train_task(sample_blocks: list, clusters: int, seed: int) -> np.ndarray:
    return _train(vectors_of(concat_blocks(ray.get(sample_blocks), pa.schema([("embedding", pa.binary())]))), clusters, seed)


def _assign(batch: pa.Table, centroids, assign: int) -> pa.Table:
    from restoration.retrieval.index import faiss

    if isinstance(centroids, ray.ObjectRef):
        centroids = ray.get(centroids)  # zero-copy from the node's object store; released with the job's reference

    vectors = vectors_of(batch)
    if not len(vectors):
        return pa.table({"cluster": pa.array([], pa.int64()), "source": pa.array([], pa.string()), "embedding": pa.array([], pa.binary())})
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    _, nearest = index.search(vectors, min(assign, len(centroids)))
    count = nearest.shape[1]
    return pa.table(
        {
            "cluster": pa.array(nearest.T.reshape(-1).astype(np.int64)),
            "source": pa.concat_arrays([batch.column("source").combine_chunks()] * count),
            "embedding": pa.concat_arrays([batch.column("embedding").combine_chunks()] * count),
        }
    )


def _pairs(cluster: pa.Table, threshold: float) -> pa.Table:
    """The pairs of one cluster with cosine >= threshold (a < b by URI), a block of rows at a time."""
    cluster = cluster.sort_by("source")
    sources = np.asarray(cluster.column("source").to_pylist(), dtype=object)
    if len(sources) < 2:
        return EDGE_SCHEMA.empty_table()
    vectors = vectors_of(cluster)
    limit = np.nextafter(np.float32(threshold), np.float32(-1))  # float32 rounding: equality counts, as in the exact pass
    firsts, seconds, cosines = [], [], []
    for start in range(0, len(sources), BLOCK):
        similarity = vectors[start : start + BLOCK] @ vectors.T
        rows, cols = np.nonzero(similarity >= limit)
        keep = cols > rows + start  # sorted by URI: each pair once, smaller URI first, never a row with itself
        rows, cols = rows[keep], cols[keep]
        firsts.append(rows + start)
        seconds.append(cols)
        cosines.append(similarity[rows, cols])
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    distinct = sources[first] != sources[second]  # a source written twice by a resumed run
    return pa.table(
        {"a": sources[first][distinct].tolist(), "b": sources[second][distinct].tolist(), "cosine": np.concatenate(cosines)[distinct]},
        schema=EDGE_SCHEMA,
    )


def keep_first(edges) -> pa.Table:
    """In URI order, a source with a match among the kept sources of smaller URI is dropped, naming the smallest."""
    earlier: dict[str, dict[str, float]] = {}
    for batch in edges:
        for a, b, cosine in zip(*(batch.column(name).to_pylist() for name in ("a", "b", "cosine")), strict=True):
            earlier.setdefault(b, {})[a] = cosine
    kept: dict[str, bool] = {}
    decisions = []
    for source in sorted(set(earlier) | {a for matches in earlier.values() for a in matches}):
        candidates = sorted(a for a in earlier.get(source, {}) if kept.get(a, True))
        kept[source] = not candidates
        if candidates:
            keeper = candidates[0]
            decisions.append((source, "clip_duplicate", f"CLIP cosine {earlier[source][keeper]:.4f} with {keeper}"))
    return pa.table([list(column) for column in zip(*decisions, strict=True)] or [[], [], []], schema=DECISION_SCHEMA)


@ray.remote(num_cpus=1)
def _keep_first_task(edges: ray.data.Dataset) -> pa.Table:
    return keep_first(edges.iter_batches(batch_format="pyarrow", batch_size=65536))


@ray.remote(num_cpus=1)
def _in_one_task(blocks: list, config: DedupConfig, clusters: int, seed: int) -> pa.Table:
    """The whole pass in one task, grouping in the task: for small embedding sets (a shuffle costs seconds there)."""
    from pipelines.duplicates import groups_of

    table = concat_blocks(ray.get(blocks), pa.schema([("source", pa.string()), ("embedding", pa.binary())]))
    vectors = vectors_of(table)
    rng = np.random.default_rng(seed)
    sample = vectors if len(vectors) <= config.kmeans_sample else vectors[rng.choice(len(vectors), config.kmeans_sample, replace=False)]
    assigned = _assign(table, _train(sample, clusters, seed), config.assign)
    return keep_first(_pairs(cluster, config.clip_threshold) for cluster in groups_of(assigned, "cluster"))


def find_semantic_duplicates(
    embeddings: ray.data.Dataset, rows: int, config: DedupConfig, seed: int = 0, partitions: int | None = None
) -> ray.data.Dataset:
    """(source, embedding) rows -> a materialized Dataset of clip_duplicate decisions (DECISION_SCHEMA). Below
    SMALL_ROWS assigned rows in one task; else (or with `partitions`, tests) k-means in a task sized by `memory`,
    assignment in tasks, a groupby by cluster."""
    from pipelines.duplicates import partitions_for
    from pipelines.known_sources import SMALL_ROWS

    threshold = config.clip_threshold
    if rows < 2 or threshold is None:
        return ray.data.from_arrow(DECISION_SCHEMA.empty_table())
    clusters = cluster_count(config, rows)
    if partitions is None and rows * config.assign <= SMALL_ROWS:
        return ray.data.from_arrow_refs([_in_one_task.remote(embeddings.to_arrow_refs(), config, clusters, seed)]).materialize()
    fraction = min(1.0, config.kmeans_sample / rows)
    sample = embeddings.random_sample(fraction, seed=seed) if fraction < 1 else embeddings
    sample_blocks = sample.select_columns(["embedding"]).to_arrow_refs()
    width_bytes = 4 * 1280  # an upper bound per vector (ViT-bigG is 1280-d) for the task's memory
    memory = int(min(rows, config.kmeans_sample) * width_bytes * 3 + 512 * 2**20)
    centroids_ref = _train_task.options(memory=memory).remote(sample_blocks, clusters, seed)
    assigned = embeddings.map_batches(
        _assign, fn_kwargs={"centroids": centroids_ref, "assign": config.assign}, batch_format="pyarrow", batch_size=4096
    )
    partitions = partitions or partitions_for(rows * config.assign)
    edges = (
        assigned.groupby("cluster", num_partitions=partitions)
        .map_groups(_pairs, fn_kwargs={"threshold": threshold}, batch_format="pyarrow")
        .materialize()
    )
    return ray.data.from_arrow_refs([_keep_first_task.remote(edges)]).materialize()
