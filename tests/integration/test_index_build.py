"""The reference index end to end on a local Ray instance: the sample corpus, a dataset's stored embeddings and its
CLIP near-duplicates, S3 through moto, resume after a fault, bad input."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.build_dataset import build_dataset
from pipelines.build_index import build_index
from pipelines.config import DataBuildConfig, IndexConfig
from restoration.dataset import embedding_matrix
from restoration.errors import InputError
from restoration.retrieval.references import ReferenceIndex
from restoray.cli import main
from runtime.config import StorageConfig
from tests.integration.corpus import photos, png_bytes
from tests.integration.test_build_dataset import local_ray, read, small_config  # noqa: F401  (the module's Ray instance)

SAMPLE_DATA = DataBuildConfig.model_validate({"quality": {"min_short_side": 256}})
SMALL_DATA = small_config()  # 160-px photos pass its quality settings
INDEX = IndexConfig.model_validate({"embed": {"num_cpus": 0.5, "batch_size": 4}, "tuning_queries": 10})


def table(directory: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in sorted(directory.glob("*.parquet"))])


@pytest.fixture(scope="module")
def sample_index(shared_sample_index, local_ray):  # noqa: F811
    """The sample corpus's index (tests/conftest.py: built once per session, shared with the serving tests)."""
    _, images, output = shared_sample_index()
    return images, output


def test_sample_corpus_index_returns_each_image_and_a_recompressed_copy_first(sample_index, capsys):
    images, output = sample_index
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["complete"] and manifest["sources_in"] == len(images) == manifest["embedded"] + manifest["rejected"]
    assert manifest["plan"]["type"] == "flat" and manifest["count"] == manifest["embedded"] > 0
    assert np.load(output / "vectors.npy").shape == (manifest["count"], manifest["dim"])
    stored = table(output / "references")
    assert stored.num_rows == manifest["count"]
    for row in stored.to_pylist()[:3]:  # the restoration model's size: the tiny preset's native 64 px short side
        assert min(Image.open(io.BytesIO(row["image"])).size) == manifest["reference_short_side"] == 64

    index = ReferenceIndex.load(output)
    embedded = set(index.sources)
    for path in images:
        if str(path) in embedded:
            (top,) = index.query([Image.open(path).convert("RGB")], k=1)[0]
            assert top.source == str(path) and top.similarity > 0.9999 and min(top.image.size) == 64
    # A recompressed, slightly resized copy finds its original first, clearly ahead of the next (the tiny random
    # CLIP puts every photo near 1, so the margin is measured, not a constant).
    original = next(path for path in images if str(path) in embedded)
    photo = Image.open(original).convert("RGB")
    buffer = io.BytesIO()
    photo.resize((photo.width * 9 // 10, photo.height * 9 // 10), Image.BICUBIC).save(buffer, "JPEG", quality=70)
    copy = output.parent / "copy.jpg"
    copy.write_bytes(buffer.getvalue())
    first, second = index.query([Image.open(copy)], k=2)[0]
    assert first.source == str(original) and first.similarity > second.similarity
    assert main(["index", "query", str(copy), "--index", str(output), "-k", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("1", "2"))]
    assert lines[0].split()[-1] == str(original) and len(lines) == 2
    # A completed build is a no-op.
    again = build_index(str(output.parent / "samples"), str(output), IndexConfig(), SAMPLE_DATA, "tiny")
    assert again.already_complete


def test_restore_retrieves_a_reference_and_falls_back_below_the_threshold(sample_index, capsys, tmp_path):
    from restoration.restorer import Restorer
    from restoration.settings import SamplerConfig

    images, output = sample_index
    index = ReferenceIndex.load(output)
    restorer = Restorer.from_pretrained("tiny")
    photo = Image.open(images[0]).convert("RGB").resize((96, 64))
    sampler = SamplerConfig(steps=2)
    taken = restorer.restore(photo, prompt="a photo", references="auto", index=index, sampler=sampler, min_similarity=-1.0)
    assert len(taken.references) == 1 and not taken.retrieval.fell_back
    similarity = taken.retrieval.candidates[0][1]
    assert taken.references[0].similarity == similarity and taken.references[0].source in index.sources
    # Above the best candidate's similarity nothing is used: the plain restoration, and the result says so.
    fallback = restorer.restore(photo, prompt="a photo", references="auto", index=index, sampler=sampler, min_similarity=similarity + 1e-4)
    plain = restorer.restore(photo, prompt="a photo", sampler=sampler)
    assert fallback.retrieval.fell_back and fallback.references == []
    np.testing.assert_array_equal(np.asarray(fallback.image), np.asarray(plain.image))
    assert not np.array_equal(np.asarray(taken.image), np.asarray(plain.image))
    # The command line: --references auto --index.
    out = tmp_path / "restored.png"
    args = ["restore", str(images[0]), "--output", str(out), "--references", "auto", "--index", str(output), "--steps", "2"]
    assert main([*args, "--min-similarity", "-1", "--prompt", "x"]) == 0
    assert "references: " in capsys.readouterr().out and out.is_file()
    assert main([*args, "--min-similarity", "1", "--prompt", "x"]) == 0  # the stage-1 image is no stored image
    assert "restored without a reference" in capsys.readouterr().out
    assert main(["restore", str(images[0]), "--output", str(out), "--references", "auto"]) == 2  # no --index
    assert "needs --index" in capsys.readouterr().err


def test_dataset_sources_stored_embeddings_and_clip_duplicates(tmp_path, local_ray):  # noqa: F811
    from restoration.models.base import load_clip_scorer
    from restoration.models.presets import load_preset

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number, image in enumerate(photos(5)):
        (corpus / f"{number}.png").write_bytes(png_bytes(image))
    with_clip = {"enabled": True, "num_cpus": 0.5}
    plain = build_dataset(str(corpus), str(tmp_path / "plain"), small_config(embed=with_clip, dedup={"clip_threshold": None}), "tiny")
    embeddings = table(tmp_path / "plain" / "embeddings")
    # One row per accepted source, the tiny CLIP's embedding of the source image.
    assert sorted(embeddings.column("source").to_pylist()) == sorted(str(p) for p in corpus.glob("*.png"))
    assert plain.sources_accepted == 5
    spec = load_preset("tiny")
    scorer = load_clip_scorer(spec.clip_scorer, seed=spec.seed)
    vectors = embedding_matrix(embeddings.column("embedding"))
    expected = scorer.embed_images([Image.open(source) for source in embeddings.column("source").to_pylist()]).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-5)

    # The closest pair at the threshold: the larger URI of it goes, nothing else.
    sources = embeddings.column("source").to_pylist()
    cosines = vectors @ vectors.T
    np.fill_diagonal(cosines, -1)
    a, b = np.unravel_index(np.argmax(cosines), cosines.shape)
    threshold = float(cosines[a, b])
    assert np.sum(cosines >= threshold) == 2  # one pair (both orders)
    dropped = max(sources[a], sources[b])
    dedup = build_dataset(str(corpus), str(tmp_path / "dedup"), small_config(embed=with_clip, dedup={"clip_threshold": threshold}), "tiny")
    rejects = read(tmp_path / "dedup", "rejects")
    assert [(r["source"], r["reason"]) for r in rejects] == [(dropped, "clip_duplicate")] and min(sources[a], sources[b]) in rejects[0][
        "detail"
    ]
    assert dropped not in {row["source"] for row in read(tmp_path / "dedup", "shards")}
    assert dropped not in table(tmp_path / "dedup" / "embeddings").column("source").to_pylist()
    assert (dedup.sources_accepted, dedup.sources_rejected, dedup.rejected_by_reason) == (4, 1, {"clip_duplicate": 1})

    # The index of that dataset: its accepted sources, with the embeddings it stored (a doctored copy shows they are
    # the ones used, not recomputed).
    doctored = tmp_path / "doctored"
    doctored.mkdir()
    stored = table(tmp_path / "dedup" / "embeddings")
    unit = np.zeros(vectors.shape[1], "<f4")
    unit[0] = 1.0
    changed = stored.column("source")[0].as_py()
    values = [unit.tobytes(), *stored.column("embedding").to_pylist()[1:]]
    pq.write_table(stored.set_column(2, "embedding", pa.array(values, pa.binary())), doctored / "part-0.parquet")
    summary = build_index(str(tmp_path / "dedup"), str(tmp_path / "index"), INDEX, SMALL_DATA, "tiny", embeddings_uri=str(doctored))
    assert summary.embedded == 4 and summary.sources_in == 4
    index = ReferenceIndex.load(tmp_path / "index")
    assert sorted(index.sources) == sorted(set(sources) - {dropped})
    np.testing.assert_array_equal(index.searcher.vectors[index.sources.index(changed)], unit)


def test_s3_output_resumes_after_a_fault_without_re_embedding(tmp_path, local_ray, moto_endpoint, aws_test_credentials, monkeypatch):  # noqa: F811
    import boto3
    import s3fs

    from restoray.config import load_config
    from restoray.index import load_index

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number, image in enumerate(photos(6)):
        (corpus / f"{number}.png").write_bytes(png_bytes(image))
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="indexes")
    storage = StorageConfig(s3_endpoint_url=moto_endpoint)
    # IVF with its lists on disk, vectors added by Ray tasks two at a time: the whole stage-2 path, uploaded to S3.
    config = INDEX.model_copy(
        update={
            "max_rows_per_shard": 2,
            "embed": INDEX.embed.model_copy(update={"batch_size": 2}),
            "index_type": "ivf",
            "on_disk": True,
            "add_batch": 2,
        }
    )
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Exception, match="fail_after_rows"):
        patch.setenv("RESTORAY_FAULTS", "index.fail_after_rows=2")
        build_index(str(corpus), "s3://indexes/v1", config, SMALL_DATA, "tiny", storage)
    time.sleep(2)  # write tasks of the aborted run still in flight finish their renames
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint})
    fs.invalidate_cache()
    listed = fs.find("indexes/v1/embeddings", detail=True)
    first = {path: info["ETag"] for path, info in listed.items() if path.endswith(".parquet")}
    done = sum(pq.read_metadata(fs.open(path, "rb")).num_rows for path in first)
    assert 0 < done < 6
    summary = build_index(str(corpus), "s3://indexes/v1", config, SMALL_DATA, "tiny", storage)
    assert summary.embedded == 6 and summary.embedded_now == 6 - done  # finished shards were not embedded again
    fs.invalidate_cache()
    listed = fs.find("indexes/v1/embeddings", detail=True)
    assert all(listed[path]["ETag"] == etag for path, etag in first.items())
    assert fs.exists("indexes/v1/index.faiss") and fs.exists("indexes/v1/vectors.npy") and fs.exists("indexes/v1/index.faiss.ivfdata")
    assert summary.plan["type"] == "ivf" and summary.plan["on_disk"]
    run = load_config(None, [f"storage.s3_endpoint_url={moto_endpoint}", f"storage.cache_dir={tmp_path / 'cache'}"])
    index = load_index("s3://indexes/v1", run)
    (top,) = index.query([Image.open(corpus / "3.png")], k=1)[0]
    assert top.source == str(corpus / "3.png")


def test_bad_input_exits_2_naming_it(tmp_path, local_ray, sample_index, capsys):  # noqa: F811
    _, output = sample_index
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["index", "build", "--input", str(empty), "--output", str(tmp_path / "out")]) == 2
    assert "empty" in capsys.readouterr().err
    image = tmp_path / "query.png"
    image.write_bytes(png_bytes(photos(1)[0]))
    assert main(["index", "query", str(image), "--index", str(tmp_path / "missing")]) == 2
    assert "no such index" in capsys.readouterr().err
    with pytest.raises(InputError, match="32-dim embeddings"):
        ReferenceIndex.load(output, scorer=SimpleNamespace(dim=16))
    with pytest.raises(InputError, match="not a reference index"):
        ReferenceIndex.load(tmp_path)


def test_stage_two_streams_sorted_unique_vectors_and_adds_parts_from_the_file(tmp_path, local_ray, monkeypatch):  # noqa: F811
    """vectors.npy from Ray Data's sort, one row per id even when a resumed run wrote a source twice (in another file,
    across a batch boundary); the IVF parts read their own slices of it; each vector finds its own position."""
    import pipelines.build_index as build_index_module
    from restoration.dataset import source_id

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sources = [f"s3://corpus/{number:04d}.png" for number in range(300)]
    rows = [{"id": source_id(s), "source": s, "embedding": v.tobytes()} for s, v in zip(sources, vectors, strict=True)]
    (tmp_path / "embeddings").mkdir()
    for number, part in enumerate((rows[:120], rows[120:], rows[100:130])):  # rows 100..129 written twice
        pq.write_table(pa.Table.from_pylist(part), tmp_path / "embeddings" / f"part-{number}.parquet")
    monkeypatch.setattr(build_index_module, "ASSEMBLE_BATCH", 7)  # duplicates meet across batch boundaries
    order = np.argsort([row["id"] for row in rows])
    for sort_in_task in (0, 2**30):  # Ray Data's sort (forced), then pyarrow's in the task (what a small table gets)
        monkeypatch.setattr(build_index_module, "SORT_IN_TASK_BYTES", sort_in_task)
        (tmp_path / "vectors.npy").unlink(missing_ok=True)
        assembled = build_index_module._assemble_task(str(tmp_path), StorageConfig(), 330, 16, None)
        assert (assembled["count"], assembled["dim"]) == (300, 16)
        np.testing.assert_array_equal(np.load(tmp_path / "vectors.npy"), vectors[order])

    config = IndexConfig.model_validate({"index_type": "ivf", "add_batch": 70, "tuning_queries": 20})
    plan, search, _ = build_index_module._build_faiss(tmp_path, 300, 16, config)
    assert plan.type == "ivf" and plan.train_size < 300 and search.queries == 20
    import faiss

    built = faiss.read_index(str(tmp_path / "index.faiss"))
    assert built.ntotal == 300
    faiss.ParameterSpace().set_index_parameters(built, f"nprobe={plan.nlist}")
    _, found = built.search(vectors[order], 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(300))  # position i is the i-th smallest id
