"""Duplicates: exact (SHA-256 of the source bytes) and near (64-bit DCT perceptual hash within a Hamming radius).

Deciding needs every image's hashes, so it is a global step: a first pass computes (source, sha256, phash) for the
images that pass decoding and basic quality, `pipelines.duplicates.find_duplicates` decides in Ray tasks, and the
main pass's read tasks reject the sources it named without reading them (pipelines/known_sources.py). The
`find_duplicates` here is the single-process reference the distributed pass is tested equal to, and
`find_clip_duplicates` the exact CLIP pass semantic dedup (pipelines/semantic_dedup.py) is measured against. In
each group the smallest source URI is kept, so the choice does not depend on the order Ray processed the rows in.
Near-duplicate candidates are found with LSH on four 16-bit bands of the hash (two hashes within distance <= 3
share a band) and then checked exactly; max_hamming above 3 may miss pairs that share no band, which is the usual
trade of banding.
"""

from __future__ import annotations

import numpy as np

from pipelines.config import DedupConfig
from pipelines.rows import image_of, quality_of
from restoration.measures import hamming, perceptual_hash


def hashes_row(row: dict) -> dict:
    row["sha256"] = quality_of(row)["sha256"]
    row["phash"] = perceptual_hash(image_of(row))
    return row


def find_duplicates(sources: list[str], sha256: list[str], phash: list[int], config: DedupConfig) -> dict[str, tuple[str, str]]:
    """{rejected source: (reason, detail)}; deterministic whatever the input order."""
    order = sorted(range(len(sources)), key=lambda i: sources[i])
    decisions: dict[str, tuple[str, str]] = {}
    kept: list[int] = []
    if config.exact:
        first_by_sha: dict[str, int] = {}
        for index in order:
            if sha256[index] in first_by_sha:
                decisions[sources[index]] = ("duplicate", f"same bytes as {sources[first_by_sha[sha256[index]]]}")
            else:
                first_by_sha[sha256[index]] = index
                kept.append(index)
    else:
        kept = order
    if config.perceptual:
        buckets: dict[tuple[int, int], list[int]] = {}
        parent = {index: index for index in kept}

        def root(index: int) -> int:
            while parent[index] != index:
                parent[index] = parent[parent[index]]
                index = parent[index]
            return index

        for index in kept:
            for band in range(4):
                buckets.setdefault((band, (phash[index] >> (16 * band)) & 0xFFFF), []).append(index)
        for members in buckets.values():
            for position, a in enumerate(members):
                for b in members[position + 1 :]:
                    if hamming(phash[a], phash[b]) <= config.max_hamming:
                        ra, rb = root(a), root(b)
                        if ra != rb:
                            # The smaller source URI becomes the root, so it is the one kept.
                            parent[max(ra, rb, key=lambda i: sources[i])] = min(ra, rb, key=lambda i: sources[i])
        for index in kept:
            keeper = root(index)
            if keeper != index:
                distance = hamming(phash[index], phash[keeper])
                decisions[sources[index]] = ("near_duplicate", f"perceptual hash {distance} bits from {sources[keeper]}")
    return decisions


def find_clip_duplicates(sources: list[str], vectors: np.ndarray, threshold: float) -> dict[str, str]:
    """{dropped source: detail}: in URI order, a source whose embedding has cosine >= threshold with an earlier kept
    source is dropped (each dropped source names the kept one it repeats, so a chain of near-duplicates does not drop
    an image unlike every kept one). Candidates come from faiss range search over the normalised embeddings."""
    from restoration.retrieval.index import faiss

    if len(sources) < 2:
        return {}
    order = sorted(range(len(sources)), key=lambda i: sources[i])
    ordered = np.ascontiguousarray(vectors[order], dtype=np.float32)
    index = faiss.IndexFlatIP(ordered.shape[1])
    index.add(ordered)
    # Inner-product range search returns scores above the radius; nudge it so equality counts.
    limits, scores, neighbours = index.range_search(ordered, float(np.nextafter(np.float32(threshold), np.float32(-1))))
    kept = np.ones(len(order), dtype=bool)
    dropped: dict[str, str] = {}
    for position in range(len(order)):
        span = slice(limits[position], limits[position + 1])
        earlier = [(int(n), float(c)) for n, c in zip(neighbours[span], scores[span], strict=True) if n < position and kept[n]]
        if earlier:
            keeper, cosine = min(earlier)
            kept[position] = False
            dropped[sources[order[position]]] = f"CLIP cosine {cosine:.4f} with {sources[order[keeper]]}"
    return dropped
