"""The faiss side of the reference index: which index for how many vectors in how much memory, training, adding in
parts and merging, exact re-ranking from memory-mapped vectors, and tuning the search to a recall target.

Embeddings are L2-normalised, so every index uses inner product (cosine). Index types (a closed list, `INDEX_TYPES`),
chosen as autofaiss's published rules do (autofaiss itself pins numpy<2):
- `flat`: exact search; below `FLAT_BELOW` vectors nothing else pays off.
- `hnsw`: HNSW32 over the full vectors while (4d + 8M)·N bytes fit the memory budget (M = 32 links).
- `ivf`: IVF with about 4√N lists over the full vectors, when those fit and HNSW's links do not.
- `ivf_pq`: IVF + product-quantised codes, the code size the largest that fits the budget; from `OPQ_FROM` vectors
  on with an OPQ rotation in front and an HNSW coarse quantiser (autofaiss's "OPQ + IVF_HNSW + PQ").
IVF lists can live on disk (`faiss.contrib.ondisk`): the resident part is then the coarse quantiser alone.
Short lists are re-ranked exactly against the vectors, read from a memory-mapped `vectors.npy`, so the resident
index fits the budget and compressed codes still return the true nearest.

Search parameters (nprobe, quantizer_efSearch, efSearch from faiss's `ParameterSpace`, and our re-rank depth) are
tuned on held-out queries against exact search: a greedy ascent from the cheapest setting, one parameter one step
at a time (the one with the most recall per extra second), until 10-recall@10 reaches the target.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

try:
    import faiss
except ModuleNotFoundError as err:  # the two wheels both provide `faiss`, so neither is a base dependency
    raise ModuleNotFoundError(
        "faiss is not installed: pip install 'restoray[cpu]' (faiss-cpu), or 'restoray[gpu]' (faiss-gpu) on CUDA"
    ) from err

INDEX_TYPES = ("flat", "hnsw", "ivf", "ivf_pq")
FLAT_BELOW = 10_000
OPQ_FROM = 1_000_000
HNSW_LINKS = 32
# Graph quality at build: faiss's default 40 left HNSW32 at 0.91 10-recall@10 on 1M clustered 768-d vectors even at
# efSearch 512 with 32x re-ranking (bench/index.py); 80 doubles the build time.
HNSW_EF_CONSTRUCTION = 80
PQ_SIZES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128)  # bytes per vector of PQ codes (8-bit sub-quantisers)
PQ_TRAIN_POINTS = 256 * 39  # faiss's minimum for 256 centroids per sub-quantiser
VECTORS_PER_BUILD_CPU = 250_000  # the stage-2 task asks one CPU per this many vectors ...
MAX_BUILD_CPUS = 8  # ... up to this many
RERANK_DEPTHS = (1, 2, 4, 8, 16, 32)  # multiples of k the index returns before exact re-ranking
RECALL_K = 10
FILE_BLOCK_BYTES = 64 * 2**20  # what a scan of vectors.npy reads at a time


class IndexTooLarge(ValueError):
    """No index type fits the memory budget for this many vectors."""


@dataclass
class IndexPlan:
    """What to build: the type, faiss's factory string and the resident size it is expected to take."""

    type: str
    factory: str
    nlist: int = 0
    pq_bytes: int = 0
    opq: bool = False
    on_disk: bool = False
    train_size: int = 0
    resident_bytes: int = 0
    build_cpus: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def build_cpus(plan_type: str, count: int) -> int:
    """Threads for training, adding and tuning: a flat index has nothing to train; the others get one per
    VECTORS_PER_BUILD_CPU vectors, up to MAX_BUILD_CPUS (faiss's OpenMP k-means and HNSW insertion gain little past 8)."""
    if plan_type == "flat":
        return 1
    return max(1, min(MAX_BUILD_CPUS, count // VECTORS_PER_BUILD_CPU))


def list_count(count: int) -> int:
    """About 4√N inverted lists, a power of two, at most 2^16, and no more than N / 39 (faiss wants 39 training
    points per list; a forced IVF over a handful of vectors gets one list)."""
    target = 4 * math.sqrt(max(count, 1))
    nlist = 2 ** max(0, min(16, round(math.log2(target))))
    while nlist > 1 and nlist * 39 > count:
        nlist //= 2
    return nlist


def _pq_layout(dim: int, pq_bytes: int, opq: bool) -> tuple[str, str]:
    """(pre-transform, codes) factory parts; OPQ rotates to 4 dims per sub-quantiser (at most d)."""
    if opq:
        rotated = min(dim - dim % pq_bytes, 4 * pq_bytes)
        return f"OPQ{pq_bytes}_{rotated},", f"PQ{pq_bytes}"
    return "", f"PQ{pq_bytes}"


def plan_index(count: int, dim: int, max_memory: int, index_type: str | None = None, on_disk: bool | None = None) -> IndexPlan:
    """The index for `count` vectors of `dim` floats within `max_memory` resident bytes (`index_type` forces one;
    `on_disk` None decides by memory). Raises IndexTooLarge when nothing fits."""
    if index_type is not None and index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; known: {', '.join(INDEX_TYPES)}")
    vector_bytes = 4 * dim
    nlist = list_count(count)
    centroids = nlist * vector_bytes
    flat = vector_bytes * count
    hnsw = (vector_bytes + 8 * HNSW_LINKS) * count
    ivf = (vector_bytes + 8) * count + centroids
    chosen = index_type
    if chosen is None:
        if count < FLAT_BELOW and flat <= max_memory:
            chosen = "flat"
        elif hnsw <= max_memory:
            chosen = "hnsw"
        elif ivf <= max_memory:
            chosen = "ivf"
        else:
            chosen = "ivf_pq"
    if chosen == "flat":
        return IndexPlan("flat", "Flat", resident_bytes=flat, on_disk=False)
    if chosen == "hnsw":
        return IndexPlan("hnsw", f"HNSW{HNSW_LINKS},Flat", resident_bytes=hnsw, build_cpus=build_cpus("hnsw", count))
    if chosen == "ivf":
        disk = bool(on_disk) if on_disk is not None else ivf > max_memory
        resident = centroids if disk else ivf
        return IndexPlan(
            "ivf",
            f"IVF{nlist},Flat",
            nlist=nlist,
            on_disk=disk,
            train_size=min(count, 64 * nlist),
            resident_bytes=resident,
            build_cpus=build_cpus("ivf", count),
        )
    opq = count >= OPQ_FROM
    coarse = f"IVF{nlist}_HNSW{HNSW_LINKS}" if opq else f"IVF{nlist}"
    coarse_bytes = centroids + (8 * HNSW_LINKS * nlist if opq else 0)
    sizes = [m for m in PQ_SIZES if m <= dim and (opq or dim % m == 0)]
    if not sizes:
        raise IndexTooLarge(f"no PQ code size divides the dimension {dim}")

    def resident(m: int, disk: bool) -> int:
        fixed = coarse_bytes + (dim * dim * 4 if opq else 0) + 256 * 4 * dim  # OPQ matrix, PQ centroids
        return fixed + (0 if disk else (m + 8) * count)

    disk = bool(on_disk) if on_disk is not None else resident(sizes[0], False) > max_memory
    fitting = [m for m in sizes if resident(m, disk) <= max_memory]
    if not fitting:
        raise IndexTooLarge(
            f"{count:,} vectors of {dim} dims do not fit index.max_memory = {max_memory:,} bytes even with "
            f"{sizes[0]}-byte PQ codes (needs {resident(sizes[0], disk):,}); raise index.max_memory"
            + ("" if disk else " or set index.on_disk = true")
        )
    # On disk the codes' size does not count against memory; keep them at 64 bytes at most (the usual trade).
    m = min(fitting[-1], 64) if disk else fitting[-1]
    pre, codes = _pq_layout(dim, m, opq)
    train = min(count, max(64 * nlist, PQ_TRAIN_POINTS))
    factory = f"{pre}{coarse},{codes}"
    return IndexPlan(
        "ivf_pq", factory, nlist, m, opq, disk, train_size=train, resident_bytes=resident(m, disk), build_cpus=build_cpus("ivf_pq", count)
    )


def new_index(plan: IndexPlan, dim: int, opq_iterations: int = 50) -> faiss.Index:
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.type == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if plan.type == "ivf_pq":
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.do_polysemous_training = False  # polysemous codes are a Hamming pre-filter we do not use; training them is slow
        if plan.opq:
            faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).niter = opq_iterations
    return index


def train_index(index: faiss.Index, sample: np.ndarray) -> None:
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))


def empty_copy(index: faiss.Index) -> np.ndarray:
    """The trained, empty index serialised (what each add task starts from)."""
    return faiss.serialize_index(index)


def add_part(trained_empty: np.ndarray, vectors: np.ndarray, first_id: int) -> np.ndarray:
    """Add `vectors` with ids first_id.. to a copy of the trained empty index; the filled copy, serialised."""
    index = faiss.deserialize_index(trained_empty)
    ids = np.arange(first_id, first_id + len(vectors), dtype=np.int64)
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
    return faiss.serialize_index(index)


def merge_parts(trained_empty: np.ndarray, parts: list[np.ndarray]) -> faiss.Index:
    """IVF (plain or behind OPQ) parts merged into one index in memory."""
    index = faiss.deserialize_index(trained_empty)
    for part in parts:
        other = faiss.deserialize_index(part)
        index.merge_from(other, 0)
        del other
    return index


def merge_parts_on_disk(trained_empty: np.ndarray, part_files: list[Path], index_file: Path) -> None:
    """IVF parts merged into lists on disk: `index_file` and `index_file.ivfdata` beside it (load the index with
    IO_FLAG_ONDISK_SAME_DIR)."""
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.deserialize_index(trained_empty)
    merge_ondisk(index, [str(path) for path in part_files], str(index_file) + ".ivfdata")
    # Lists written relative to the index, so the directory can move (faiss records the file name it was given).
    ivf = faiss.extract_index_ivf(index)
    faiss.downcast_InvertedLists(ivf.invlists).filename = index_file.name + ".ivfdata"
    faiss.write_index(index, str(index_file))


def read_index(index_file: Path, on_disk: bool) -> faiss.Index:
    return faiss.read_index(str(index_file), faiss.IO_FLAG_ONDISK_SAME_DIR if on_disk else 0)


class VectorFileWriter:
    """An (N, dim) float32 .npy written row block by row block, N unknown until the end: the header is written with
    room to spare and rewritten with the final shape on close (numpy's format allows any space padding before the
    header's newline). What the index build streams its sorted embeddings into; it never holds more than a block."""

    HEADER_BYTES = 128  # magic (6) + version (2) + length (2) + the dict, space-padded: a multiple of 64 as numpy writes

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows = 0
        self.dim = 0
        self._file = open(self.path, "wb")
        self._file.write(self._header())

    def _header(self) -> bytes:
        text = "{" + f"'descr': '<f4', 'fortran_order': False, 'shape': ({self.rows}, {self.dim}), " + "}"
        length = self.HEADER_BYTES - 10
        return b"\x93NUMPY\x01\x00" + length.to_bytes(2, "little") + text.ljust(length - 1).encode("latin1") + b"\n"

    def write(self, vectors: np.ndarray) -> None:
        if not len(vectors):
            return
        if self.dim and vectors.shape[1] != self.dim:
            raise ValueError(f"{self.path}: rows of {vectors.shape[1]} dims after rows of {self.dim}")
        self.dim = vectors.shape[1]
        self._file.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        self.rows += len(vectors)

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(self._header())
        self._file.close()


def vector_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of an .npy of vectors, copied out of a mapping that is dropped again: a scan over the file in
    blocks keeps one block resident, not every page it touched (a mapping held open counts them all in the RSS)."""
    mapped = np.load(path, mmap_mode="r")
    rows = np.array(mapped[start:stop], dtype=np.float32)
    del mapped
    return rows


def exact_neighbours(vectors: np.ndarray | Path, queries: np.ndarray, k: int, block: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, scanning `vectors` in blocks (an array, or an .npy file read block by block)."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    if isinstance(vectors, Path):
        count, dim = np.load(vectors, mmap_mode="r").shape
        block = max(1, min(block, FILE_BLOCK_BYTES // (4 * max(dim, 1))))  # a block's bytes, not rows, bound what is held
    else:
        count = len(vectors)
    for start in range(0, count, block):
        if isinstance(vectors, Path):
            chunk = vector_rows(vectors, start, start + block)
        else:
            chunk = np.ascontiguousarray(vectors[start : start + block], dtype=np.float32)
        flat = faiss.IndexFlatIP(chunk.shape[1])
        flat.add(chunk)
        scores, ids = flat.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(chunk)))
        ids = np.where(ids >= 0, ids + start, -1)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    return best_scores, best_ids


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = RECALL_K) -> float:
    """k-recall@k: the share of the true k nearest among the k returned."""
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist()) - {-1}) for f, t in zip(found, truth, strict=True))
    return hits / (len(truth) * k)


@dataclass
class SearchParameters:
    """Tuned search settings, stored with the index and applied when it loads."""

    faiss: str = ""  # ParameterSpace string, e.g. "nprobe=16,quantizer_efSearch=64"
    rerank: int = 1  # the index returns rerank x k candidates, re-ranked exactly
    recall: float = 1.0  # measured 10-recall@10 on the tuning queries
    qps: float = 0.0  # measured queries per second (one thread)
    exact_qps: float = 0.0  # exact flat search on the same queries
    queries: int = 0
    evaluated: list[dict] = field(default_factory=list)


class Searcher:
    """An index plus the vectors it was built from (memory-mapped), searching with exact re-ranking."""

    def __init__(self, index: faiss.Index, vectors: np.ndarray, parameters: SearchParameters | None = None):
        self.index = index
        self.vectors = vectors
        self.exact = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
        self.parameters = parameters or SearchParameters()
        self.apply(self.parameters)

    def apply(self, parameters: SearchParameters) -> None:
        self.parameters = parameters
        if parameters.faiss:
            faiss.ParameterSpace().set_index_parameters(self.index, parameters.faiss)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, positions) of the k nearest, best first; positions -1 past the end of a short result."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.index.ntotal)
        if self.exact or self.parameters.rerank <= 0:
            return self.index.search(queries, k)
        depth = min(self.index.ntotal, k * self.parameters.rerank)
        _, candidates = self.index.search(queries, depth)
        scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
        for row, ids in enumerate(candidates):
            valid = ids >= 0
            if valid.any():
                # Sorted reads keep the memory-mapped file's access sequential.
                order = np.argsort(ids[valid])
                picked = ids[valid][order]
                exact = np.asarray(self.vectors[picked], dtype=np.float32) @ queries[row]
                placed = np.empty_like(exact)
                placed[order] = exact
                scores[row, valid] = placed
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, 1)
        top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(candidates, order, 1), -1)
        return top_scores, top_ids


def _ranges(index: faiss.Index) -> list[tuple[str, list[float]]]:
    space = faiss.ParameterSpace()
    space.initialize(index)
    ranges = []
    for position in range(space.parameter_ranges.size()):
        parameter = space.parameter_ranges.at(position)
        values = faiss.vector_to_array(parameter.values).tolist()
        # "ht": the polysemous Hamming threshold (codes are not trained for it); an empty range (nprobe of one list).
        if parameter.name != "ht" and values:
            if parameter.name == "efSearch":  # ParameterSpace stops at 512; large graphs want more
                values = [*values, 1024.0, 2048.0]
            ranges.append((parameter.name, values))
    return ranges


def _gain(point: dict, current: dict) -> float:
    """Recall gained per extra second of search."""
    return (point["recall"] - current["recall"]) / max(point["seconds"] - current["seconds"], 1e-6)


def without_self(ids: np.ndarray, own: np.ndarray | None, k: int) -> np.ndarray:
    """The first k ids of each row with the query's own position left out (own[i]: query i's position in the index)."""
    if own is None:
        return ids[:, :k]
    kept = np.full((len(ids), k), -1, dtype=np.int64)
    for row, (found, self_id) in enumerate(zip(ids, own, strict=True)):
        others = found[found != self_id][:k]
        kept[row, : len(others)] = others
    return kept


def tune(
    searcher: Searcher,
    queries: np.ndarray,
    target_recall: float,
    k: int = RECALL_K,
    repeats: int = 1,
    query_ids: np.ndarray | None = None,
    vectors_file: Path | None = None,
) -> SearchParameters:
    """The cheapest setting found whose k-recall@k on `queries` reaches `target_recall` (or the best there is).
    `query_ids`: the queries' own positions when they are vectors of the index: every search then asks for k + 1 and
    drops the query itself from truth and results, so the recall is what a new query sees (each query finds itself
    at distance 0, which alone would add up to 1/k to the recall). `vectors_file`: the searcher's vectors as a file,
    scanned block by block for the exact truth (the build's task then never holds the whole file resident)."""
    depth = k + 1 if query_ids is not None else k
    truth_started = time.perf_counter()
    _, truth = exact_neighbours(vectors_file or searcher.vectors, queries, depth)
    truth = without_self(truth, query_ids, k)
    exact_seconds = time.perf_counter() - truth_started
    exact_qps = len(queries) / max(exact_seconds, 1e-9)
    if searcher.exact:
        parameters = SearchParameters(recall=1.0, qps=exact_qps, exact_qps=exact_qps, queries=len(queries))
        searcher.apply(parameters)
        return parameters
    ranges = [*_ranges(searcher.index), ("rerank", [float(depth) for depth in RERANK_DEPTHS])]
    evaluated: list[dict] = []

    def measure(position: tuple[int, ...]) -> dict:
        settings = {name: values[i] for (name, values), i in zip(ranges, position, strict=True)}
        text = ",".join(f"{name}={int(value)}" for name, value in settings.items() if name != "rerank")
        candidate = SearchParameters(faiss=text, rerank=int(settings["rerank"]))
        searcher.apply(candidate)
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            _, found = searcher.search(queries, depth)
            best = min(best, time.perf_counter() - started)
        found = without_self(found, query_ids, k)
        point = {"faiss": text, "rerank": candidate.rerank, "recall": recall_at(found, truth, k), "seconds": best}
        evaluated.append(point)
        return point

    position = tuple(0 for _ in ranges)
    current = measure(position)
    while current["recall"] < target_recall:
        steps = []
        for axis, (_, values) in enumerate(ranges):
            if position[axis] + 1 < len(values):
                moved = (*position[:axis], position[axis] + 1, *position[axis + 1 :])
                steps.append((moved, measure(moved)))
        if not steps:
            break
        reaching = [step for step in steps if step[1]["recall"] >= target_recall]
        if reaching:
            position, current = min(reaching, key=lambda step: step[1]["seconds"])
            break

        position, current = max(steps, key=lambda step, now=current: _gain(step[1], now))
    parameters = SearchParameters(
        faiss=current["faiss"],
        rerank=current["rerank"],
        recall=current["recall"],
        qps=len(queries) / max(current["seconds"], 1e-9),
        exact_qps=exact_qps,
        queries=len(queries),
        evaluated=evaluated,
    )
    searcher.apply(parameters)
    return parameters
