"""The faiss index: choice by count and memory, parts added apart and merged (in memory and on disk), re-ranking
from memory-mapped vectors, and tuning each type to the recall target on synthetic clustered vectors."""

from __future__ import annotations

import itertools

import faiss
import numpy as np
import pytest

from restoration.retrieval.index import (
    IndexPlan,
    IndexTooLarge,
    Searcher,
    VectorFileWriter,
    add_part,
    empty_copy,
    exact_neighbours,
    merge_parts,
    merge_parts_on_disk,
    new_index,
    plan_index,
    read_index,
    recall_at,
    train_index,
    tune,
    vector_rows,
    without_self,
)

DIM = 32
TARGET = 0.95
PQ_BUDGET = 500_000  # 8-byte codes for 20k vectors of 32 dims
_built: dict[str, faiss.Index] = {}


def clustered(count: int, dim: int = DIM, clusters: int = 100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, count)] + 0.6 * rng.normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    faiss.omp_set_num_threads(1)
    vectors = clustered(20_000)
    path = tmp_path_factory.mktemp("vectors") / "vectors.npy"
    np.save(path, vectors)
    queries = clustered(200, seed=1)
    return np.load(path, mmap_mode="r"), queries


def build(plan: IndexPlan, vectors: np.ndarray, parts: int = 3) -> faiss.Index:
    if plan.factory not in _built:
        _built[plan.factory] = _build(plan, vectors, parts)
    return _built[plan.factory]


def _build(plan: IndexPlan, vectors: np.ndarray, parts: int) -> faiss.Index:
    index = new_index(plan, DIM, opq_iterations=4)
    rng = np.random.default_rng(0)
    train_index(index, vectors[np.sort(rng.choice(len(vectors), plan.train_size or len(vectors), replace=False))])
    if plan.type in ("flat", "hnsw"):
        index.add(np.asarray(vectors))
        return index
    empty = empty_copy(index)
    bounds = np.linspace(0, len(vectors), parts + 1).astype(int)
    return merge_parts(empty, [add_part(empty, vectors[a:b], int(a)) for a, b in itertools.pairwise(bounds)])


def test_the_type_follows_count_and_memory():
    assert plan_index(5_000, 512, 10**9).type == "flat"
    assert plan_index(100_000, 512, 10**9).type == "hnsw"  # (4*512 + 256) * 1e5 = 230 MB
    assert plan_index(1_000_000, 512, 3 * 10**9).type == "hnsw"  # 2.3 GB
    ivf = plan_index(1_000_000, 768, 3_300_000_000)  # HNSW 3.33 GB does not fit, IVF-Flat 3.08 GB does
    assert ivf.type == "ivf" and ivf.nlist == 4096 and not ivf.on_disk
    small = plan_index(1_000_000, 768, 10**9)  # 1 GB: compressed codes, OPQ + HNSW coarse quantiser at 1M
    assert small.type == "ivf_pq" and small.opq and small.factory.startswith("OPQ") and "_HNSW32" in small.factory
    assert small.resident_bytes <= 10**9 and small.pq_bytes >= 64
    below = plan_index(500_000, 768, 10**8)
    assert below.type == "ivf_pq" and not below.opq and below.resident_bytes <= 10**8
    assert plan_index(500_000, 768, 10**8).pq_bytes > plan_index(500_000, 768, 3 * 10**7).pq_bytes
    # 100M codes of even 4 bytes (+ 8-byte ids) exceed 1 GB: the lists go to disk, only the coarse part stays.
    large = plan_index(100_000_000, 768, 10**9)
    assert large.on_disk and large.resident_bytes <= 10**9
    with pytest.raises(IndexTooLarge, match=r"index\.max_memory"):
        plan_index(100_000_000, 768, 10**8)
    with pytest.raises(IndexTooLarge, match="on_disk"):
        plan_index(100_000_000, 768, 10**9, on_disk=False)
    assert plan_index(50_000, 32, 10**9, index_type="ivf_pq").type == "ivf_pq"


def test_the_build_task_asks_cpus_by_the_work_the_plan_holds():
    assert plan_index(5_000, 512, 10**9).build_cpus == 1  # flat: nothing to train
    assert plan_index(100_000, 512, 10**9).build_cpus == 1
    assert plan_index(1_000_000, 768, 10**9).build_cpus == 4
    assert plan_index(100_000_000, 768, 10**9).build_cpus == 8  # at most MAX_BUILD_CPUS


@pytest.mark.parametrize(
    "plan",
    [
        plan_index(20_000, DIM, 10**9, index_type="flat"),
        plan_index(20_000, DIM, 10**9, index_type="hnsw"),
        plan_index(20_000, DIM, 10**9, index_type="ivf"),
        plan_index(20_000, DIM, PQ_BUDGET, index_type="ivf_pq"),
        # The OPQ + HNSW-coarse layout chosen from 1M vectors on, at a size a test can train.
        IndexPlan("ivf_pq", "OPQ8_32,IVF64_HNSW32,PQ8", nlist=64, pq_bytes=8, opq=True, train_size=10_000),
    ],
    ids=lambda plan: plan.factory,
)
def test_each_type_reaches_the_recall_target_after_tuning(data, plan):
    vectors, queries = data
    searcher = Searcher(build(plan, vectors), vectors)
    tuned = tune(searcher, queries, TARGET)
    _, truth = exact_neighbours(vectors, queries, 10)
    _, found = searcher.search(queries, 10)
    assert recall_at(found, truth) >= TARGET and tuned.recall >= TARGET
    assert searcher.index.ntotal == len(vectors)
    if plan.type != "flat":
        # The untuned start (the cheapest setting) is below the target for compressed codes: tuning did something.
        assert tuned.evaluated and (tuned.faiss or tuned.rerank > 1)


def test_tuning_queries_taken_from_the_index_do_not_count_themselves(data):
    vectors, _ = data
    plan = plan_index(20_000, DIM, PQ_BUDGET, index_type="ivf_pq")
    searcher = Searcher(build(plan, vectors), vectors)
    ids = np.arange(0, len(vectors), 200)  # queries that are vectors of the index, as the build's tuning draws them
    tuned = tune(searcher, vectors[ids], 0.5, query_ids=ids)  # a low target: tuning stops at a cheap setting
    _, truth = exact_neighbours(vectors, vectors[ids], 11)
    _, found = searcher.search(vectors[ids], 11)
    held_out = recall_at(without_self(found, ids, 10), without_self(truth, ids, 10))
    assert tuned.recall == pytest.approx(held_out)  # what a query that is not in the index sees
    assert all(query not in row for query, row in zip(ids, without_self(found, ids, 10), strict=True))
    assert recall_at(found[:, :10], truth[:, :10]) > held_out  # counting each query's own hit reads high


def test_pq_codes_alone_miss_what_reranking_from_the_vectors_finds(data):
    vectors, queries = data
    plan = plan_index(20_000, DIM, PQ_BUDGET, index_type="ivf_pq")
    assert plan.pq_bytes == 8
    index = build(plan, vectors)
    _, truth = exact_neighbours(vectors, queries, 10)
    faiss.ParameterSpace().set_index_parameters(index, "nprobe=64")
    _, codes_only = index.search(queries, 10)
    reranked = Searcher(index, vectors)
    reranked.apply(reranked.parameters.__class__(faiss="nprobe=64", rerank=8))
    _, found = reranked.search(queries, 10)
    assert recall_at(found, truth) >= TARGET > recall_at(codes_only, truth) + 0.1


def test_parts_merged_on_disk_search_like_the_merged_index(data, tmp_path):
    vectors, queries = data
    plan = plan_index(20_000, DIM, 10**9, index_type="ivf", on_disk=True)
    assert plan.on_disk
    index = new_index(plan, DIM)
    train_index(index, vectors[: plan.train_size])
    empty = empty_copy(index)
    part_files = []
    for number, (a, b) in enumerate(((0, 7_000), (7_000, 20_000))):
        part = tmp_path / f"part-{number}.faiss"
        faiss.write_index(faiss.deserialize_index(add_part(empty, vectors[a:b], a)), str(part))
        part_files.append(part)
    moved = tmp_path / "moved"
    moved.mkdir()
    merge_parts_on_disk(empty, part_files, moved / "index.faiss")
    assert (moved / "index.faiss.ivfdata").stat().st_size > 0
    (moved / "index.faiss").rename(tmp_path / "index.faiss")  # the lists are found beside the index, wherever it is
    (moved / "index.faiss.ivfdata").rename(tmp_path / "index.faiss.ivfdata")
    on_disk = read_index(tmp_path / "index.faiss", on_disk=True)
    in_memory = merge_parts(empty, [add_part(empty, vectors[:7_000], 0), add_part(empty, vectors[7_000:], 7_000)])
    for index in (on_disk, in_memory):
        faiss.ParameterSpace().set_index_parameters(index, "nprobe=16")
    assert on_disk.ntotal == in_memory.ntotal == len(vectors)
    np.testing.assert_array_equal(on_disk.search(queries, 10)[1], in_memory.search(queries, 10)[1])


def test_index_parts_are_added_in_a_bounded_window():
    from pipelines.build_index import windowed

    outstanding: set[int] = set()
    peak = 0

    def submit(start: int) -> int:
        nonlocal peak
        outstanding.add(start)
        peak = max(peak, len(outstanding))
        return start

    def get(ref: int) -> int:
        outstanding.discard(ref)  # collected: its slice and result are released
        return ref * 10

    starts = range(0, 50, 5)
    assert list(windowed(submit, starts, 3, get)) == [start * 10 for start in starts]  # in order
    assert peak == 3 and not outstanding


def test_vectors_streamed_into_a_file_load_as_the_array_and_scan_block_by_block(data, tmp_path):
    vectors, queries = data
    path = tmp_path / "vectors.npy"
    writer = VectorFileWriter(path)
    for start in range(0, len(vectors), 7_001):  # blocks of uneven size; the count is known only at close
        writer.write(vectors[start : start + 7_001])
    writer.write(vectors[:0])
    writer.close()
    loaded = np.load(path, mmap_mode="r")
    assert loaded.shape == vectors.shape and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, vectors)
    np.testing.assert_array_equal(vector_rows(path, 19_990, 30_000), vectors[19_990:])
    bad = VectorFileWriter(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match="dims"):
        bad.write(vectors[:2])
        bad.write(vectors[:2, :8])
    bad.close()
    # The exact truth scanned from the file in blocks equals the in-memory scan.
    from_file = exact_neighbours(path, queries, 10, block=3_000)
    in_memory = exact_neighbours(vectors, queries, 10)
    np.testing.assert_array_equal(from_file[1], in_memory[1])
    np.testing.assert_allclose(from_file[0], in_memory[0], rtol=1e-5)
