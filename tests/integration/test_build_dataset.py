"""The dataset build on a local Ray instance (2 CPUs): awkward files, every source format, S3, resume."""

from __future__ import annotations

import io
import json
import tarfile

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.build_dataset import build_dataset
from pipelines.config import DataBuildConfig, DedupConfig
from restoration.errors import InputError
from restoration.images import decode_image
from runtime.config import StorageConfig
from tests.integration.corpus import UNICODE_CAPTION, photos, png_bytes, write_awkward_corpus


@pytest.fixture(scope="module")
def local_ray():
    import os

    import ray

    # Workers inherit the environment Ray starts with: moto's fake credentials must be there from the start.
    fake = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in fake}
    os.environ.update(fake)
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="restoray-tests", log_to_driver=False)
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def small_config(**overrides) -> DataBuildConfig:
    """Fast settings for 160-px test images: no model stages unless asked, one variant of every kind over the run."""
    data = {
        "quality": {"min_short_side": 128},
        "crop": {"size": 128},
        "embed": {"enabled": False},
        "degrade": {"variants": 2, "image_format": "png"},
        "write": {"max_rows_per_shard": 4},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    return DataBuildConfig.model_validate(data)


def read(output, table: str) -> list[dict]:
    files = sorted((output / table).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def test_awkward_corpus_every_source_accounted_for(tmp_path, local_ray):
    corpus = tmp_path / "corpus"
    expected = write_awkward_corpus(corpus)
    output = tmp_path / "out"
    summary = build_dataset(str(corpus), str(output), small_config(), "tiny")

    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["complete"] and manifest["sources_in"] == len(expected)
    assert manifest["sources_in"] == manifest["sources_accepted"] + manifest["sources_rejected"]
    assert summary.sources_in == len(expected)
    rejects = {row["source"].rsplit("/", 1)[-1]: row for row in read(output, "rejects")}
    samples = read(output, "shards")
    accepted = {row["source"].rsplit("/", 1)[-1] for row in samples}
    for name, reason in expected.items():
        if reason is None:
            assert name in accepted, (name, rejects.get(name))
        else:
            assert rejects[name]["reason"] == reason, (name, rejects.get(name))
            assert rejects[name]["detail"]
    assert accepted.isdisjoint(rejects)
    assert len(samples) == 2 * len(accepted) and len({row["id"] for row in samples}) == len(samples)
    assert manifest["rejected_by_reason"]["not_image"] == 2

    by_name: dict[str, list[dict]] = {}
    for row in samples:
        by_name.setdefault(row["source"].rsplit("/", 1)[-1], []).append(row)
    # EXIF-rotated: decoded upright, so the white band is along the top of the HQ crop.
    hq = decode_image(by_name["exif_rotated.jpg"][0]["hq"])
    assert hq[:10].mean() > 240 and hq[-30:].mean() < 200
    # Captions: unicode kept exactly; the 100 kB one cut for training and kept whole in alt_text; empty/missing -> "".
    assert {row["caption"] for row in by_name["unicode_caption.png"]} == {UNICODE_CAPTION}
    assert {row["alt_text"] for row in by_name["unicode_caption.png"]} == {UNICODE_CAPTION}
    long_row = by_name["long_caption.png"][0]
    assert len(long_row["alt_text"]) == 100_000 - 1 and len(long_row["caption"]) == 2000
    assert by_name["missing_caption.png"][0]["caption"] == "" and by_name["missing_caption.png"][0]["alt_text"] is None
    # Every sample row follows the contract.
    for row in samples:
        assert row["height"] == row["width"] == 128
        assert decode_image(row["hq"]).shape == (128, 128, 3) and decode_image(row["lq"]).shape == (128, 128, 3)
        assert row["kind"] in ("realesrgan", "parameterized", "composite", "single", "degraded_negative")
        assert isinstance(json.loads(row["degradation"]), list) and "sharpness" in json.loads(row["quality"])
        assert (row["mask"] is not None) == (row["kind"] in ("composite", "single"))
    # Shards are bounded.
    assert all(pq.read_metadata(f).num_rows <= 4 for f in (output / "shards").glob("*.parquet"))


def test_generated_negatives_and_a_rerun_of_a_completed_build_is_a_no_op(tmp_path, local_ray):
    from pipelines.build_dataset import _generate_negatives
    from pipelines.stages.generate import SOURCE_PREFIX, negative_id, negative_seed
    from restoration.prompts import NEGATIVE_QUALITY_PROMPT

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, image in enumerate(photos(3)):
        (corpus / f"{index}.png").write_bytes(png_bytes(image))
    output = tmp_path / "out"
    config = small_config(negatives={"count": 2, "steps": 2, "num_cpus": 0.5})
    first = build_dataset(str(corpus), str(output), config, "tiny")
    # SUPIR's negative samples: generated by the tiny SDXL, counted apart from the sources.
    assert (first.sources_in, first.sources_accepted, first.negatives_generated, first.samples_written) == (3, 3, 2, 8)
    negatives = [row for row in read(output, "shards") if row["kind"] == "negative"]
    seeds = [negative_seed(0, index) for index in range(2)]
    assert sorted(row["id"] for row in negatives) == sorted(negative_id(NEGATIVE_QUALITY_PROMPT, seed) for seed in seeds)
    for row in negatives:
        assert row["source"].startswith(SOURCE_PREFIX) and row["caption"] == NEGATIVE_QUALITY_PROMPT
        operations = json.loads(row["degradation"])
        assert operations[0]["op"] == "generate" and operations[0]["prompt"] == NEGATIVE_QUALITY_PROMPT
        assert any(op["op"] == "usm_target" for op in operations)  # the LQ by the Real-ESRGAN chain
        hq, lq = decode_image(row["hq"]), decode_image(row["lq"])
        assert hq.shape == lq.shape == (128, 128, 3) and hq.std() > 1 and not np.array_equal(hq, lq)
    assert negatives[0]["hq"] != negatives[1]["hq"]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["negatives_generated"] == 2 and manifest["samples_by_kind"]["negative"] == 2
    files = sorted(p.name for p in (output / "shards").iterdir())
    second = build_dataset(str(corpus), str(output), config, "tiny")
    assert second.already_complete and not first.already_complete
    assert second.samples_written == first.samples_written == 8 and second.negatives_generated == 2
    assert sorted(p.name for p in (output / "shards").iterdir()) == files
    # Resumed: negatives already written are not generated again.
    from runtime.config import StorageConfig
    from runtime.storage import filesystem

    fs, root = filesystem(str(output), StorageConfig())
    _generate_negatives(config, "tiny", StorageConfig(), fs, root, str(output), None)
    assert sorted(p.name for p in (output / "shards").iterdir()) == files
    with pytest.raises(InputError, match="another input or config"):
        build_dataset(str(corpus), str(output), small_config(degrade={"variants": 1}), "tiny")
    with pytest.raises(ValueError, match=r"data\.negatives\.count"):
        small_config(degrade={"kinds": {"negative": 1.0}})


def test_resume_after_interruption_gives_the_uninterrupted_row_set(tmp_path, local_ray):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, image in enumerate(photos(8)):
        (corpus / f"{index:02d}.png").write_bytes(png_bytes(image))
    (corpus / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    config = small_config(write={"max_rows_per_shard": 2}, dedup={"perceptual": False})
    reference = build_dataset(str(corpus), str(tmp_path / "reference"), config, "tiny")

    interrupted = tmp_path / "interrupted"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Exception, match="fail_after_rows"):
        patch.setenv("RESTORAY_FAULTS", "build.fail_after_rows=3")
        build_dataset(str(corpus), str(interrupted), config, "tiny")
    partial = read(interrupted, "shards")
    assert 0 < len(partial) < reference.samples_written
    resumed = build_dataset(str(corpus), str(interrupted), config, "tiny")
    assert resumed.sources_in == reference.sources_in == 9
    ids = [row["id"] for row in read(interrupted, "shards")]
    assert len(ids) == len(set(ids))  # never duplicated
    assert sorted(ids) == sorted(row["id"] for row in read(tmp_path / "reference", "shards"))
    reference_rows = {row["id"]: row["lq"] for row in read(tmp_path / "reference", "shards")}
    assert all(reference_rows[row["id"]] == row["lq"] for row in read(interrupted, "shards"))  # same samples, byte for byte
    assert [r["source"] for r in read(interrupted, "rejects")] == [r["source"] for r in read(tmp_path / "reference", "rejects")]


def test_parquet_and_webdataset_sources(tmp_path, local_ray):
    images = photos(4)
    table = pa.table(
        {"jpg": [png_bytes(image, "JPEG", quality=92) for image in images] + [b"junk"], "caption": [f"photo {i}" for i in range(5)]}
    )
    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    pq.write_table(table.slice(0, 3), parquet_dir / "part-0.parquet")
    pq.write_table(table.slice(3), parquet_dir / "part-1.parquet")
    summary = build_dataset(str(parquet_dir), str(tmp_path / "from-parquet"), small_config(), "tiny")
    assert (summary.sources_in, summary.sources_accepted, summary.sources_rejected) == (5, 4, 1)
    captions = {row["source"].rsplit("/", 1)[-1]: row["caption"] for row in read(tmp_path / "from-parquet", "shards")}
    assert captions["part-0.parquet#row=1"] == "photo 1" and captions["part-1.parquet#row=0"] == "photo 3"

    # A webdataset shard whose members are NOT ordered by key, plus a key without an image.
    tar_path = tmp_path / "wds" / "shard-000.tar"
    tar_path.parent.mkdir()
    members = []
    for index, image in enumerate(images[:3]):
        members.append((f"sample{index}.jpg", png_bytes(image, "JPEG", quality=92)))
        members.append((f"sample{index}.json", json.dumps({"caption": f"wds caption {index}"}).encode()))
    members.append(("orphan.txt", b"a caption without an image"))
    order = [0, 3, 2, 5, 1, 4, 6]
    with tarfile.open(tar_path, "w") as tar:
        for position in order:
            name, payload = members[position]
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    summary = build_dataset(str(tar_path.parent), str(tmp_path / "from-wds"), small_config(), "tiny")
    assert (summary.sources_in, summary.sources_accepted, summary.sources_rejected) == (4, 3, 1)
    rows = read(tmp_path / "from-wds", "shards")
    from restoration.degradations import ops

    checked = 0
    for row in rows:
        if row["kind"] == "degraded_negative":
            continue  # degraded negatives replace the HQ
        index = int(row["source"].rsplit("#sample", 1)[-1])
        assert row["caption"] == f"wds caption {index}"
        expected = cv2.resize(images[index], (128, 128), interpolation=cv2.INTER_AREA)
        if row["kind"] == "realesrgan":  # the target is USM-sharpened, as BasicSR's l1_gt_usm
            expected = ops.to_uint8(ops.usm_sharpen(ops.to_float(expected)))
        hq = decode_image(row["hq"]).astype(int)
        assert np.abs(hq - expected.astype(int)).mean() < 6  # each key got its own image, not a neighbour's
        checked += 1
    assert checked >= 3
    assert read(tmp_path / "from-wds", "rejects")[0]["reason"] == "not_image"


def test_bad_inputs_fail_fast(tmp_path, local_ray):
    with pytest.raises(InputError, match="does not exist"):
        build_dataset(str(tmp_path / "missing"), str(tmp_path / "out"), small_config(), "tiny")
    with pytest.raises(InputError, match="must differ"):
        build_dataset(str(tmp_path), str(tmp_path), small_config(), "tiny")
    with pytest.raises(ValueError, match="kinds must map"):
        small_config(degrade={"kinds": {"sharpen": 1.0}})


def test_s3_input_and_output_through_moto(tmp_path, local_ray, moto_endpoint, aws_test_credentials):
    import boto3
    import s3fs

    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="corpus")
    s3.create_bucket(Bucket="datasets")
    for index, image in enumerate(photos(3)):
        s3.put_object(Bucket="corpus", Key=f"photos/{index}.jpg", Body=png_bytes(image, "JPEG", quality=92))
        s3.put_object(Bucket="corpus", Key=f"photos/{index}.txt", Body=f"s3 caption {index}".encode())
    s3.put_object(Bucket="corpus", Key="photos/broken.jpg", Body=b"\x00" * 10)
    summary = build_dataset("s3://corpus/photos", "s3://datasets/v1", small_config(), "tiny", StorageConfig(s3_endpoint_url=moto_endpoint))
    assert (summary.sources_in, summary.sources_accepted, summary.sources_rejected) == (4, 3, 1)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint})
    manifest = json.loads(fs.cat("datasets/v1/manifest.json"))
    assert manifest["complete"] and manifest["samples_written"] == 6
    shards = [p for p in fs.find("datasets/v1/shards") if p.endswith(".parquet")]
    rows = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in shards]).to_pylist()
    assert {row["caption"] for row in rows} == {"s3 caption 0", "s3 caption 1", "s3 caption 2"}
    assert all(row["source"].startswith("s3://corpus/photos/") for row in rows)
    # The training feed reads the same shards from S3 (decoded and cropped in Ray Data tasks).
    from training.config import TrainConfig
    from training.data import check_shards, training_dataset

    train = TrainConfig(data="s3://datasets/v1", resolution=64)
    storage = StorageConfig(s3_endpoint_url=moto_endpoint)
    assert check_shards(train, storage, min_rows=1)["rows"] == 6
    batch = training_dataset(train, 0, storage).take_batch(4, batch_format="numpy")
    assert batch["hq"].shape == batch["lq"].shape == (4, 64, 64, 3) and batch["mask"].shape == (4, 64, 64)
    assert {str(caption) for caption in batch["caption"]} <= {"s3 caption 0", "s3 caption 1", "s3 caption 2"}


def test_s3_errors_fail_fast_naming_the_uri(tmp_path, local_ray, moto_endpoint, aws_test_credentials):
    with pytest.raises(InputError, match="s3://no-such-bucket/photos"):
        storage = StorageConfig(s3_endpoint_url=moto_endpoint)
        build_dataset("s3://no-such-bucket/photos", str(tmp_path / "out"), small_config(), "tiny", storage)
    from tests.conftest import free_port

    unreachable = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(InputError, match="s3://corpus/photos"):
        build_dataset("s3://corpus/photos", str(tmp_path / "out2"), small_config(), "tiny", StorageConfig(s3_endpoint_url=unreachable))


def _s3_corpus(moto_endpoint: str, bucket: str, count: int) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket=bucket)
    keys = []
    for index, image in enumerate(photos(count)):
        key = f"photos/{index}.png"
        s3.put_object(Bucket=bucket, Key=key, Body=png_bytes(image))
        keys.append(key)
    return keys


# Faults are answered for more consecutive attempts than botocore (client_attempts = 2) and s3fs (5 tries of
# throttling and connection errors) absorb: 2 x 5 = 10, so 11 failures reach our own retry, which then succeeds.
FAULT_STORAGE = {"client_attempts": 2, "attempts": 4, "backoff_s": 0.2}


def test_transient_storage_faults_are_retried_and_every_source_lands_once(tmp_path, local_ray, moto_endpoint, aws_test_credentials):
    from tests.integration.fault_proxy import FaultProxy

    keys = _s3_corpus(moto_endpoint, "flaky", 4)
    faults = {keys[0]: "slowdown", keys[1]: "reset", keys[2]: "unavailable"}
    with FaultProxy(moto_endpoint, "transient", faults, count=11) as proxy:
        storage = StorageConfig(s3_endpoint_url=proxy.endpoint, **FAULT_STORAGE)
        summary = build_dataset("s3://flaky/photos", str(tmp_path / "out"), small_config(dedup={"perceptual": False}), "tiny", storage)
    assert all(proxy.hits[key] == 11 for key in faults), proxy.hits  # every fault was answered in full, then passed
    assert (summary.sources_in, summary.sources_accepted, summary.sources_rejected) == (4, 4, 0)
    sources = [row["source"] for row in read(tmp_path / "out", "shards")]
    assert sorted(set(sources)) == [f"s3://flaky/{key}" for key in keys] and len(sources) == 4 * 2  # each once, 2 variants
    assert read(tmp_path / "out", "rejects") == []


def test_persistent_403_stops_the_build_with_exit_1_and_no_rejects(tmp_path, local_ray, moto_endpoint, aws_test_credentials, capsys):
    from restoray.cli import main
    from tests.integration.fault_proxy import FaultProxy

    _s3_corpus(moto_endpoint, "locked", 3)
    with FaultProxy(moto_endpoint, "forbidden") as proxy:
        sets = [f"storage.s3_endpoint_url={proxy.endpoint}", "storage.attempts=2", "storage.backoff_s=0.1", "data.embed.enabled=false"]
        sets += ["data.quality.min_short_side=128", "data.crop.size=128", "data.caption.mode=keep-source", "data.negatives.count=0"]
        arguments = ["data", "build", "--input", "s3://locked/photos", "--output", str(tmp_path / "out")]
        code = main([*arguments, *(item for value in sets for item in ("--set", value))])
    error = capsys.readouterr().err
    assert code == 1, error
    assert "storage failure on s3://locked/photos/" in error and any(word in error for word in ("403", "AccessDenied", "Forbidden"))
    assert proxy.hits  # the listing passed; object reads were refused
    assert read(tmp_path / "out", "rejects") == [] and read(tmp_path / "out", "shards") == []
    # Once the storage answers again, the same command resumes and finishes the build.
    resumed = [*sets[:1], *sets[3:]]
    resumed[0] = f"storage.s3_endpoint_url={moto_endpoint}"
    assert main([*arguments, *(item for value in resumed for item in ("--set", value))]) == 0
    assert len({row["source"] for row in read(tmp_path / "out", "shards")}) == 3


def test_corrupt_parquet_rows_are_rejects_and_read_error_share_stops_the_build(tmp_path, local_ray):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    table = pa.table({"jpg": [png_bytes(image) for image in photos(3)], "caption": ["a", "b", "c"]})
    pq.write_table(table, corpus / "good.parquet")
    (corpus / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    summary = build_dataset(str(corpus), str(tmp_path / "out"), small_config(), "tiny")
    rejects = read(tmp_path / "out", "rejects")
    assert [(row["source"].rsplit("/", 1)[-1], row["reason"]) for row in rejects] == [("broken.parquet", "read_error")]
    assert summary.sources_accepted == 3

    folder = tmp_path / "mostly-missing"
    folder.mkdir()
    for index, image in enumerate(photos(4)):
        (folder / f"{index}.png").write_bytes(png_bytes(image))
    from pipelines.listing import list_sources

    listed = list_sources(str(folder), DataBuildConfig().source, StorageConfig())
    for path in sorted(folder.glob("*.png"))[:3]:
        path.unlink()  # listed, then gone: three read errors among four sources
    config = small_config(source={"max_read_error_share": 0.5, "read_error_min_sources": 4})
    from pipelines.build_dataset import BuildStopped

    with pytest.raises(BuildStopped, match="3 of the first 4 sources could not be read"):
        build_dataset(str(folder), str(tmp_path / "out2"), config, "tiny", listed=listed)


def test_retry_rejected_reads_rejected_sources_again_and_corrupt_manifest_is_named(tmp_path, local_ray):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    images = photos(3)
    for index, image in enumerate(images):
        (corpus / f"{index}.png").write_bytes(png_bytes(image))
    from pipelines.listing import list_sources

    listed = list_sources(str(corpus), DataBuildConfig().source, StorageConfig())
    (corpus / "2.png").unlink()
    output = tmp_path / "out"
    first = build_dataset(str(corpus), str(output), small_config(), "tiny", listed=listed)
    assert first.rejected_by_reason == {"read_error": 1}
    (corpus / "2.png").write_bytes(png_bytes(images[2]))  # the file is back
    again = build_dataset(str(corpus), str(output), small_config(), "tiny", listed=listed)
    assert again.already_complete  # without --retry-rejected a completed build is a no-op
    retried = build_dataset(str(corpus), str(output), small_config(), "tiny", listed=listed, retry_rejected=("read_error",))
    assert (retried.sources_accepted, retried.sources_rejected) == (3, 0)
    assert read(output, "rejects") == []
    with pytest.raises(InputError, match="unknown reasons smudged"):
        build_dataset(str(corpus), str(output), small_config(), "tiny", retry_rejected=("smudged",))
    (output / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match=r"manifest\.json is corrupt"):
        build_dataset(str(corpus), str(output), small_config(), "tiny")


def test_training_rows_that_do_not_decode_are_counted_and_too_many_fail(local_ray):
    import ray

    from restoration.degradations.sample import KINDS
    from training.config import TrainConfig
    from training.data import PrepareRows, TooManyDecodeFailures, new_decode_counter

    good = png_bytes(photos(1)[0])
    rows = [("a", good), ("b", good), ("c", b"\x89PNG broken"), ("d", good)]
    table = pa.table(
        {
            "id": [row_id for row_id, _ in rows],
            "caption": ["x"] * 4,
            "hq": [data for _, data in rows],
            "lq": [data for _, data in rows],
            "kind": [KINDS[0]] * 4,
            "degradation": ["[]"] * 4,
            "restoration_prompt": [""] * 4,
            "mask": [None] * 4,
        }
    )
    lenient = TrainConfig(resolution=64, max_decode_failure_share=0.5, decode_failure_min_rows=1)
    counter = new_decode_counter()
    batch = PrepareRows(lenient, seed=0, counter=counter)(table)
    assert batch["hq"].shape == (3, 64, 64, 3)  # the broken row is skipped ...
    assert ray.get(counter.totals.remote()) == (4, 1)  # ... and counted
    strict = TrainConfig(resolution=64, max_decode_failure_share=0.1, decode_failure_min_rows=1)
    with pytest.raises(TooManyDecodeFailures, match="1 of 4 training rows did not decode"):
        PrepareRows(strict, seed=0, counter=new_decode_counter())(table)


def _planted_scan(count: int, seed: int) -> tuple[list[str], list[str], list[int]]:
    """Hashes with planted exact copies, near copies (1-3 bits), chains of near copies and crowded band buckets."""
    rng = np.random.default_rng(seed)
    sources = [f"s3://corpus/{rng.integers(10**9):09d}-{i}.jpg" for i in range(count)]
    sha = [f"sha-{i}" for i in range(count)]
    phash = rng.integers(0, 2**63, count, dtype=np.int64).tolist()
    for i in range(0, count - 3, 7):
        sha[i + 1] = sha[i]  # an exact copy (and so the same perceptual hash)
        phash[i + 1] = phash[i]
        phash[i + 2] = phash[i] ^ (1 << int(rng.integers(63)))  # a near copy (the scan stores signed int64)
        phash[i + 3] = phash[i + 2] ^ (0b11 << int(rng.integers(61)))  # a chain: 2 bits from the near copy
    shared_band = int(rng.integers(2**16))
    for i in range(count // 3, count // 3 + 200):  # 200 hashes sharing one 16-bit band: a crowded bucket
        phash[i] = (phash[i] & ~0xFFFF) | shared_band
    return sources, sha, phash


@pytest.mark.parametrize(
    ("dedup", "partitions"),
    [
        (DedupConfig(), 3),
        (DedupConfig(exact=False), 3),
        (DedupConfig(), 1),
        (DedupConfig(exact=False), 1),
        (DedupConfig(perceptual=False), 1),
        (DedupConfig(max_hamming=1), 1),
    ],
    ids=["default, shuffled", "perceptual only, shuffled", "default", "perceptual only", "exact only", "max_hamming 1"],
)
def test_ray_data_dedup_equals_the_single_process_pass(local_ray, dedup, partitions):
    import ray

    from pipelines.duplicates import as_dict
    from pipelines.duplicates import find_duplicates as distributed
    from pipelines.stages.dedup import find_duplicates as reference

    sources, sha, phash = _planted_scan(3000, seed=5)
    expected = reference(sources, sha, phash, dedup)
    assert sum(reason == "near_duplicate" for reason, _ in expected.values()) > (300 if dedup.perceptual else -1)
    order = np.random.default_rng(1).permutation(len(sources))  # rows in another order, in several blocks
    table = pa.table({"source": [sources[i] for i in order], "sha256": [sha[i] for i in order], "phash": [phash[i] for i in order]})
    scan = ray.data.from_arrow(table).repartition(4)
    assert as_dict(distributed(scan, dedup, partitions)) == expected
