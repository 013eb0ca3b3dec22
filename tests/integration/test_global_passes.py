"""The global passes of the builds (pipelines/known_sources, counts, semantic_dedup, listing, resume): each equal in
its one-task path (small inputs) and its shuffle path (Ray Data groupby/join, forced here), and semantic dedup
against the exact CLIP pass on planted embeddings."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.build_dataset import build_dataset
from pipelines.config import DedupConfig
from tests.integration.corpus import photos, png_bytes
from tests.integration.test_build_dataset import local_ray, read, small_config  # noqa: F401  (the module's Ray instance)


def planted_embeddings(count: int, dim: int, seed: int, threshold: float = 0.96, every: int = 10) -> np.ndarray:
    """Unit vectors spread uniformly (no cluster structure: k-means boundaries cut through everything), with a
    near copy (cosine in [threshold + 0.005, 0.999]) of every `every`-th vector planted next to it. A random-weight
    CLIP cannot judge likeness, so the semantic pass is measured on these."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for i in range(0, count - 1, every):
        noise = rng.standard_normal(dim).astype(np.float32)
        noise -= noise.dot(vectors[i]) * vectors[i]
        noise /= np.linalg.norm(noise)
        cosine = rng.uniform(threshold + 0.005, 0.999)
        vectors[i + 1] = cosine * vectors[i] + np.sqrt(1 - cosine**2) * noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_semantic_dedup_finds_the_exact_pass_duplicates_in_both_paths(local_ray):  # noqa: F811
    import ray

    from pipelines.duplicates import as_dict
    from pipelines.semantic_dedup import find_semantic_duplicates
    from pipelines.stages.dedup import find_clip_duplicates

    vectors = planted_embeddings(6000, 96, seed=3)
    order = np.random.default_rng(4).permutation(len(vectors))
    sources = [f"s3://corpus/{i:06d}.jpg" for i in range(len(vectors))]
    exact = find_clip_duplicates(sources, vectors, 0.96)
    assert len(exact) >= 590  # the planted copies (a chance pair of random 96-d vectors is far below 0.96)
    table = pa.table({"source": [sources[i] for i in order], "embedding": [vectors[i].tobytes() for i in order]})
    embeddings = ray.data.from_arrow(table).repartition(3)

    def recall(config: DedupConfig, partitions: int | None) -> float:
        found = as_dict(find_semantic_duplicates(embeddings, len(vectors), config, partitions=partitions))
        for source, (reason, detail) in found.items():  # every decision a true pair at or above the threshold
            keeper = detail.rsplit(" with ", 1)[1]
            assert reason == "clip_duplicate" and float(vectors[sources.index(keeper)] @ vectors[sources.index(source)]) >= 0.96 - 1e-6
        return len(set(found) & set(exact)) / len(exact)

    # Flat k-means (one cluster per embedding) splits planted pairs: the data tests the boundaries.
    assert recall(DedupConfig(clusters=12, assign=1), None) < 0.97
    assert recall(DedupConfig(clusters=12), None) >= 0.99
    assert recall(DedupConfig(clusters=12), 2) >= 0.99


def test_known_sources_and_counts_equal_in_the_one_task_and_shuffle_paths(tmp_path, local_ray):  # noqa: F811
    import ray

    from pipelines.counts import count_output
    from pipelines.known_sources import KEEP, NOTE_SCHEMA, with_known
    from pipelines.listing import UNIT_SCHEMA, Listing
    from runtime.config import StorageConfig
    from runtime.storage import filesystem

    units = [
        {"kind": "row_group", "path": "/c/a.parquet", "row_group": 0, "offset": 0, "rows": 3},
        {"kind": "row_group", "path": "/c/a.parquet", "row_group": 1, "offset": 3, "rows": 2},
        {"kind": "row_group", "path": "/c/b.parquet", "row_group": 0, "offset": 0, "rows": 2},
        {"kind": "unreadable", "path": "/c/z.parquet", "error": "read_error: not parquet"},
    ]
    notes = [
        ("/c/a.parquet#row=3", None, None),  # finished ...
        ("/c/a.parquet#row=4", None, None),  # ... so row group 1 has nothing left to read
        ("/c/a.parquet#row=0", "duplicate", "same bytes as /c/b.parquet#row=0"),
        ("/c/a.parquet#row=0", None, None),  # finished wins over a decision for the same source
        ("/c/a.parquet#row=1", "near_duplicate", "3 bits"),
        ("/c/b.parquet#row=1", KEEP, None),
        ("/c/z.parquet", None, None),  # the unreadable file's reject was written
    ]
    listing = Listing("parquet", ray.data.from_arrow(pa.Table.from_pylist(units, UNIT_SCHEMA)).materialize(), len(units))
    note_table = pa.table({"source": [n[0] for n in notes], "reason": [n[1] for n in notes], "detail": [n[2] for n in notes]})
    note_table = note_table.append_column("embedding", pa.nulls(len(notes), pa.binary())).cast(NOTE_SCHEMA)

    def annotated(partitions: int | None) -> list:
        result = with_known(listing, ray.data.from_arrow(note_table).repartition(2), len(notes), partitions=partitions)
        rows = sorted(result.units.take_all(), key=lambda row: (row["path"], row["row_group"]))
        return [(row["path"], row["row_group"], sorted((n["source"], n["reason"]) for n in row["known"] or ())) for row in rows]

    expected = [
        # A unit carries its file's notes (keyed by file): row group 0 also sees rows 3 and 4, which it skips.
        ("/c/a.parquet", 0, [(f"/c/a.parquet#row={n}", reason) for n, reason in ((0, None), (1, "near_duplicate"), (3, None), (4, None))]),
        ("/c/b.parquet", 0, [("/c/b.parquet#row=1", KEEP)]),
    ]
    assert annotated(None) == expected  # row group 1 and the finished unreadable file are gone
    assert annotated(2) == expected

    # An output with a repeated sample id and a source both accepted and rejected: both paths see the same.
    (tmp_path / "shards").mkdir()
    (tmp_path / "rejects").mkdir()
    pq.write_table(
        pa.table({"id": ["i1", "i2", "i3"], "source": ["a", "a", "b"], "kind": ["blur", "noise", "blur"]}),
        tmp_path / "shards" / "p1.parquet",
    )
    pq.write_table(
        pa.table({"id": ["i3", "n1"], "source": ["b", "neg://1"], "kind": ["blur", "negative"]}), tmp_path / "shards" / "p2.parquet"
    )
    pq.write_table(
        pa.table({"source": ["b", "c", "d", "d"], "reason": ["blurry", "blurry", "duplicate", "duplicate"]}),
        tmp_path / "rejects" / "r.parquet",
    )
    fs, root = filesystem(str(tmp_path), StorageConfig())
    one_task = count_output(fs, root, str(tmp_path), StorageConfig(), "shards")
    shuffled = count_output(fs, root, str(tmp_path), StorageConfig(), "shards", partitions=2)
    assert one_task == shuffled
    assert one_task.samples_by_kind == {"blur": 3, "noise": 1, "negative": 1} and one_task.rejected_by_reason == {
        "blurry": 2,
        "duplicate": 2,
    }
    assert (one_task.accepted_sources, one_task.repeated_ids, one_task.rejected_twice, one_task.accepted_and_rejected) == (2, 1, 1, 1)


def test_resume_after_a_kill_on_the_shuffle_paths(tmp_path, local_ray, monkeypatch):  # noqa: F811
    """The resumed build's anti-join, per-unit notes and counts as Ray Data shuffles (forced: every size is 'large')."""
    from pipelines import counts, known_sources, resume

    corpus = tmp_path / "corpus"
    (corpus / "a").mkdir(parents=True)
    (corpus / "b").mkdir()
    for index, image in enumerate(photos(6)):
        (corpus / ("a" if index % 2 else "b") / f"{index:02d}.png").write_bytes(png_bytes(image))
    (corpus / "a" / "03-copy.png").write_bytes((corpus / "a" / "03.png").read_bytes())  # an exact duplicate
    (corpus / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    config = small_config(write={"max_rows_per_shard": 2}, dedup={"perceptual": False})
    reference = build_dataset(str(corpus), str(tmp_path / "reference"), config, "tiny")
    assert reference.rejected_by_reason["duplicate"] == 1 and reference.sources_rejected == 2

    interrupted = tmp_path / "interrupted"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Exception, match="fail_after_rows"):
        patch.setenv("RESTORAY_FAULTS", "build.fail_after_rows=3")
        build_dataset(str(corpus), str(interrupted), config, "tiny")
    assert 0 < len(read(interrupted, "shards")) < reference.samples_written
    for module in (counts, known_sources, resume):
        monkeypatch.setattr(module, "SMALL_ROWS", 0)
    resumed = build_dataset(str(corpus), str(interrupted), config, "tiny")
    assert (resumed.sources_in, resumed.sources_accepted, resumed.rejected_by_reason) == (
        reference.sources_in,
        reference.sources_accepted,
        reference.rejected_by_reason,
    )
    ids = [row["id"] for row in read(interrupted, "shards")]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(row["id"] for row in read(tmp_path / "reference", "shards"))
    assert sorted(r["source"] for r in read(interrupted, "rejects")) == sorted(r["source"] for r in read(tmp_path / "reference", "rejects"))


def test_report_histograms_equal_numpy_over_every_shard(tmp_path, local_ray):  # noqa: F811
    """The report's streamed histograms (one range aggregation, then per-block bin counts) equal numpy's over all
    samples; a score no sample recorded has none, and samples without a score are left out of its histogram."""
    import json

    from pipelines.report import BINS, score_histograms
    from runtime.config import StorageConfig
    from runtime.storage import filesystem

    rng = np.random.default_rng(5)
    sharpness, entropy = rng.uniform(10, 900, 300), rng.normal(6, 1, 300)
    (tmp_path / "shards").mkdir()
    for part in range(3):
        rows = range(part * 100, part * 100 + 100)
        quality = [json.dumps({"sharpness": sharpness[i], **({"entropy": entropy[i]} if i % 3 else {})}) for i in rows]
        pq.write_table(pa.table({"quality": quality}), tmp_path / "shards" / f"part-{part}.parquet", row_group_size=40)
    fs, root = filesystem(str(tmp_path), StorageConfig())
    histograms = score_histograms(fs, root, str(tmp_path), StorageConfig())
    assert set(histograms) == {"sharpness", "entropy"}
    for name, values in (("sharpness", sharpness), ("entropy", entropy[np.arange(300) % 3 != 0])):
        counts, edges = histograms[name]
        np.testing.assert_allclose(edges, np.linspace(values.min(), values.max(), BINS + 1))
        np.testing.assert_array_equal(counts, np.histogram(values, bins=edges)[0])
