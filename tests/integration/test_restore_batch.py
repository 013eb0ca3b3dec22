"""`restoray restore-batch` and `restoray eval` on local Ray (tiny preset): outputs named after the sources, results
and rejects, a run stopped by the test-only fault and resumed (the same outputs, nothing twice), a finished job a
no-op; a protocol's seeded test set (the same for any number of workers), scores, the MLflow runs and their
comparison, bad input."""

from __future__ import annotations

import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import DataBuildConfig, RestoreBatchConfig
from pipelines.restore_batch import restore_batch
from restoration.settings import RestoreConfig, SamplerConfig
from restoray.cli import main
from tests.integration.test_build_dataset import local_ray  # noqa: F401  (the module's Ray instance)


def corpus(root, colliding_names: bool = False):
    rng = np.random.default_rng(0)
    (root / "nested").mkdir(parents=True)
    for index in range(5):
        size = (64, 48) if index % 2 == 0 else (48, 64)  # two working sizes: batched and alone
        folder = root / "nested" if index == 4 else root
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"photo{index}.png")
    (root / "broken.png").write_bytes(b"not an image at all")
    if colliding_names:  # names that once overwrote each other's output: photo0.jpg ~ photo0.png, "photo 1" ~ photo_1
        Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(root / "photo0.jpg", quality=95)
        for name in ("photo 1.png", "photo_1.png"):
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / name)
    return root


def results(output) -> list[dict]:
    return pq.read_table(output / "results").to_pylist()


def test_restore_batch_stops_resumes_and_names_outputs_after_sources(tmp_path, local_ray):  # noqa: F811
    source = corpus(tmp_path / "corpus", colliding_names=True)
    output = tmp_path / "out"
    config = RestoreBatchConfig(batch_size=2, max_rows_per_shard=1, num_cpus=0.5)
    data = DataBuildConfig.model_validate({"source": {"read_parallelism": 4}})
    args = (str(source), str(output), config, data, "tiny", SamplerConfig(steps=1), RestoreConfig(seed=3))
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Exception, match="fail_after_rows"):
        patch.setenv("RESTORAY_FAULTS", "restore.fail_after_rows=1")
        restore_batch(*args, prompt="a photo")
    time.sleep(2)  # write tasks of the aborted run still in flight finish their renames
    first = {row["source"]: (output / row["output"]).read_bytes() for row in results(output)}
    assert 0 < len(first) < 8
    summary = restore_batch(*args, prompt="a photo")
    assert summary.sources_in == 9 and summary.restored == 8 and summary.rejected_by_reason == {"not_image": 1}
    assert summary.restored_now == 8 - len(first)  # what the first run finished was not restored again
    rows = results(output)
    assert sorted(row["source"] for row in rows) == sorted({row["source"] for row in rows})  # nothing twice
    outputs = {row["source"].rsplit("/", 1)[-1]: row["output"] for row in rows}
    # a source keeps its name where it can; a changed name (extension, sanitised) gets its URI's hash: nothing shared
    assert {outputs[f"photo{i}.png"] for i in range(4)} | {outputs["photo_1.png"]} == {
        *(f"images/photo{i}.png" for i in range(4)), "images/photo_1.png"}  # fmt: skip
    assert outputs["photo4.png"] == "images/nested/photo4.png" and len(set(outputs.values())) == 8
    assert re.fullmatch(r"images/photo0~[0-9a-f]{10}\.png", outputs["photo0.jpg"])
    assert re.fullmatch(r"images/photo_1~[0-9a-f]{10}\.png", outputs["photo 1.png"])
    for row in rows:
        image = Image.open(output / row["output"])
        assert image.size == Image.open(row["source"]).size == (row["width"], row["height"])
        assert row["seed"] == 3 and row["caption"] == "a photo" and row["model"] == "tiny"
        if row["source"] in first:
            assert (output / row["output"]).read_bytes() == first[row["source"]]
    rejects = pq.read_table(output / "rejects").to_pylist()
    assert [(r["source"].rsplit("/", 1)[-1], r["reason"]) for r in rejects] == [("broken.png", "not_image")]
    # A second run of a finished job does nothing; the CLI prints the summary.
    code = main(["restore-batch", "--input", str(source), "--output", str(output), "--steps", "1", "--seed", "3",
                 "--prompt", "a photo", "--set", "restore_batch.batch_size=2", "--set", "restore_batch.max_rows_per_shard=1",
                 "--set", "restore_batch.num_cpus=0.5", "--set", "data.source.read_parallelism=4"])  # fmt: skip
    assert code == 0
    assert len(results(output)) == 8


def test_restore_batch_refuses_bad_input_before_work(tmp_path, local_ray, capsys):  # noqa: F811
    source = corpus(tmp_path / "corpus")
    assert main(["restore-batch", "--input", str(source), "--output", str(source)]) == 2
    assert "--output must differ from --input" in capsys.readouterr().err
    assert main(["restore-batch", "--input", str(source), "--output", str(tmp_path / "o"), "--references", "auto"]) == 2
    assert "needs --index" in capsys.readouterr().err
    assert main(["restore-batch", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o2")]) == 2


def test_an_autoscaling_cluster_is_waited_for_then_the_job_stops_naming_the_resources(tmp_path, local_ray, caplog):  # noqa: F811
    """On an autoscaling cluster a pool larger than the cluster is not refused up front (exit 2), as it is on a
    fixed-size one: the job waits for the autoscaler, saying so, and stops after ray.resource_wait_s (exit 1). The
    embedded instance never grows, so the wait runs out here."""
    from restoration.errors import InputError
    from runtime.resources import ResourcePolicy, ResourceWaitError, policy, set_policy

    source = corpus(tmp_path / "corpus")
    config = RestoreBatchConfig(actors=1, num_cpus=3)  # 3 + 1 beside them: more than the instance's 2 CPUs
    args = (str(source), str(tmp_path / "out"), config, DataBuildConfig(), "tiny", SamplerConfig(steps=1), RestoreConfig())
    with pytest.raises(InputError, match="hold 3 of this Ray instance's 2 CPUs"):
        restore_batch(*args)
    saved = policy()
    set_policy(ResourcePolicy(autoscaling=True, resource_wait_s=4))
    try:
        started = time.monotonic()
        with pytest.raises(ResourceWaitError) as err, caplog.at_level("WARNING", logger="runtime.resources"):
            restore_batch(*args, mlflow=None)
        waited = time.monotonic() - started
    finally:
        set_policy(saved)
    assert err.value.exit_code == 1 and "ray.resource_wait_s" in str(err.value) and "4 CPU" in str(err.value)
    assert "lacks 2 CPU" in str(err.value), str(err.value)
    assert "waiting for the autoscaler: the Restorer actor pool need 4 CPU" in caplog.text
    assert 4 <= waited < 60
    # The instance is usable afterwards: the stopped job released what it held.
    assert restore_batch(*args[:2], RestoreBatchConfig(num_cpus=0.5), *args[3:]).restored == 5


def hq_folder(root, count: int = 3):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(root / f"hq{index}.png")
    return root


def test_a_protocols_test_set_is_the_same_on_every_run_and_any_number_of_workers(tmp_path, local_ray):  # noqa: F811
    from pipelines.evaluate import build_testset
    from restoration.evaluation.protocols import load_protocol
    from runtime.config import StorageConfig

    data = hq_folder(tmp_path / "hq")
    protocol = load_protocol("abair-5task")
    runs = {}
    for name, workers in (("one", 1), ("two", 2), ("again", 2)):
        cases = build_testset(protocol, str(data), str(tmp_path / name), StorageConfig(), workers)
        files = sorted((tmp_path / name / "testset").rglob("*.png"))
        runs[name] = (cases, {str(f.relative_to(tmp_path / name)): f.read_bytes() for f in files})
    assert len(runs["one"][0]) == 3 * 5 and {case["type"] for case in runs["one"][0]} == set(protocol.types)
    assert runs["one"] == runs["two"] == runs["again"]


def trained_looking_weights(root):
    """The tiny preset saved as a weights folder with the training record `restoray train` exports, pointing at a
    dataset folder with a manifest: the lineage an eval run records."""
    import json

    from restoration.restorer import Restorer

    dataset = root / "dataset"
    dataset.mkdir(parents=True)
    (dataset / "manifest.json").write_text('{"complete": true, "samples_written": 3}')
    weights = root / "weights"
    Restorer.from_pretrained("tiny").save_pretrained(weights)
    (weights / "training.json").write_text(json.dumps({"stage": "adaptor", "step": 4, "run_id": "abc123", "data": str(dataset)}))
    return weights, dataset


def test_eval_scores_a_model_logs_an_mlflow_run_and_compares_two(tmp_path, local_ray, capsys):  # noqa: F811
    import hashlib

    import mlflow

    from tests.metric_weights import inception_torchscript, openai_clip_torchscript, squeezenet_weights

    data = hq_folder(tmp_path / "hq")
    weights, dataset = trained_looking_weights(tmp_path / "model")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    learned = ["--set", "eval.lpips_net=squeeze", "--set", f"eval.weights.lpips={squeezenet_weights(tmp_path / 'sq.safetensors')}",
               "--set", f"eval.weights.fid={inception_torchscript(tmp_path / 'inception')}",
               "--set", f"eval.weights.clipiqa={openai_clip_torchscript(tmp_path / 'RN50.pt')}"]  # fmt: skip
    common = ["--data", str(data), "--steps", "1", "--set", "eval.prompt=a photo", "--set", f"mlflow.tracking_uri={tracking}",
              "--set", "restore_batch.num_cpus=0.5"]  # fmt: skip
    assert main(["eval", "--protocol", "realesrgan-x4", "--output", str(tmp_path / "a"), "--weights", str(weights), *common, *learned]) == 0
    assert main(["eval", "--protocol", "realesrgan-x4", "--output", str(tmp_path / "b"), "--seed", "7", "--preset", "tiny", *common]) == 0
    out = capsys.readouterr().out
    assert f"eval realesrgan-x4 of {weights}: 3 cases" in out and "psnr" in out and "ssim" in out and "lpips" in out
    assert "skipped lpips: needs eval.weights.lpips" in out and "skipped dists: needs eval.weights.dists" in out  # run b
    assert "warning: fid over 3 images, below eval.min_fid_images = 50" in out  # run a: FID on a set too small to compare
    scores = pq.read_table(tmp_path / "a" / "scores.parquet").to_pylist()
    assert len(scores) == 3 and all(0 < row["psnr"] < 100 and -1 <= row["ssim"] <= 1 for row in scores)
    assert all(row["lpips"] > 0 and 0 <= row["clipiqa"] <= 1 for row in scores) and "fid" not in scores[0]  # fid: the set's
    for row in scores:  # the output is scored at the HQ's size (x4 from the LQ), against the original HQ
        assert Image.open(tmp_path / "a" / row["output"]).size == Image.open(tmp_path / "a" / row["hq"]).size == (96, 64)
    report = (tmp_path / "a" / "report.html").read_text()
    assert report.count("<img") == 3 * 3 and "lpips" in report and "fid" in report and "abc123" in report  # LQ, output, HQ
    assert "<h2>Warnings</h2>" in report and "below eval.min_fid_images" in report
    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("restoray-eval").experiment_id])
    assert len(runs) == 2 and all(run.data.params["protocol"] == "realesrgan-x4" and "psnr" in run.data.metrics for run in runs)
    assert runs[0].data.params["testset_hash"] == runs[1].data.params["testset_hash"]  # the same seeded test set
    a, b = sorted(runs, key=lambda run: run.info.start_time)
    # Lineage: the scored model's training run and data, and the hash of that dataset's manifest.
    manifest_hash = hashlib.sha256((dataset / "manifest.json").read_bytes()).hexdigest()
    assert (a.data.params["train_run_id"], a.data.params["train_data_manifest_sha256"]) == ("abc123", manifest_hash)
    assert b.data.params["train_run_id"] == "none" and "lpips" in b.data.params["skipped_metrics"]
    assert {"lpips", "fid", "clipiqa"} <= set(a.data.metrics) and "lpips" not in b.data.metrics
    assert "fid over 3 images" in a.data.tags["restoray.warnings"] and "restoray.warnings" not in b.data.tags
    artifacts = {item.path for item in client.list_artifacts(a.info.run_id)}
    assert {"scores.parquet", "report.html"} <= artifacts
    assert main(["eval", "compare", a.info.run_id, b.info.run_id, "--set", f"mlflow.tracking_uri={tracking}"]) == 0
    table = capsys.readouterr().out
    delta = b.data.metrics["psnr"] - a.data.metrics["psnr"]
    assert "psnr" in table and f"{delta:+.4f}" in table and "lpips" in table
    # No reference: real LQ images restored and scored by the no-reference metrics alone.
    clip = ["--set", f"eval.weights.clipiqa={tmp_path / 'RN50.pt'}", "--preset", "tiny"]
    assert main(["eval", "--protocol", "no-reference", "--output", str(tmp_path / "n"), *common, *clip]) == 0
    no_reference = pq.read_table(tmp_path / "n" / "scores.parquet").to_pylist()
    assert len(no_reference) == 3 and all(0 <= row["clipiqa"] <= 1 and row["hq"] is None and "psnr" not in row for row in no_reference)
    assert "skipped psnr: needs an HQ reference" in capsys.readouterr().out


def test_eval_bad_input_exits_2_naming_it(tmp_path, local_ray, capsys):  # noqa: F811
    data = hq_folder(tmp_path / "hq", 1)
    assert main(["eval", "--protocol", "sharpest", "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    assert "unknown protocol 'sharpest'" in capsys.readouterr().err
    paired = tmp_path / "paired"
    hq_folder(paired / "HQ", 2)
    hq_folder(paired / "LQ", 1)
    assert main(["eval", "--protocol", "paired", "--data", str(paired), "--output", str(tmp_path / "p"), "--preset", "tiny"]) == 2
    assert "LQ/ and HQ/ hold different images" in capsys.readouterr().err
    lpips = ["--set", 'eval.metrics=["psnr", "lpips"]', "--preset", "tiny"]
    assert main(["eval", "--protocol", "realesrgan-x4", "--data", str(data), "--output", str(tmp_path / "l"), *lpips]) == 2
    assert "asks for lpips, which needs eval.weights.lpips" in capsys.readouterr().err
    missing = ["--set", f"eval.weights.fid={tmp_path / 'inception.pth'}", "--preset", "tiny"]
    assert main(["eval", "--protocol", "realesrgan-x4", "--data", str(data), "--output", str(tmp_path / "f"), *missing]) == 2
    assert "eval.weights.fid" in capsys.readouterr().err and not (tmp_path / "f").exists()  # refused before any work


def noisy_copies(hq, root, sigma: float = 10.0):
    """Each HQ image with seeded noise, saved under the same name (what a restoration run would have written)."""
    rng = np.random.default_rng(5)
    root.mkdir(parents=True)
    for path in sorted(hq.glob("*.png")):
        pixels = np.asarray(Image.open(path)).astype(float)
        Image.fromarray(np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).astype(np.uint8)).save(root / path.name)
    return root


def test_eval_score_pairs_folders_by_name_honours_the_border_and_refuses_a_missing_pair(
    tmp_path,
    local_ray,  # noqa: F811
    capsys,
    moto_endpoint,
    aws_test_credentials,
):
    import mlflow

    from restoration.evaluation.conventions import MetricConvention
    from restoration.evaluation.metrics import psnr, ssim

    gt = hq_folder(tmp_path / "gt")
    pred = noisy_copies(gt, tmp_path / "pred")
    tracking = ["--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    score = ["eval", "score", "--pred", str(pred), "--gt", str(gt), "--convention", "basicsr", "--crop-border", "4", *tracking]
    assert main([*score, "--output", str(tmp_path / "s")]) == 0
    assert "eval score: 3 cases" in capsys.readouterr().out
    rows = pq.read_table(tmp_path / "s" / "scores.parquet").to_pylist()
    assert [row["case"] for row in rows] == ["hq0", "hq1", "hq2"]
    for row in rows:
        images = [np.asarray(Image.open(folder / f"{row['case']}.png")) for folder in (pred, gt)]
        assert row["psnr"] == pytest.approx(psnr(*images, MetricConvention("basicsr", 4)), abs=1e-9)
        assert row["ssim"] == pytest.approx(ssim(*images, MetricConvention("basicsr", 4)), abs=1e-9)
        assert row["psnr"] != pytest.approx(psnr(*images, MetricConvention("basicsr", 0)), abs=1e-3)  # the border was cut
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("restoray-eval").experiment_id])
    assert run.data.params["convention"] == "basicsr, border crop 4" and run.data.params["gt"] == str(gt)
    assert run.data.metrics["psnr"] == pytest.approx(np.mean([row["psnr"] for row in rows]))
    assert {item.path for item in client.list_artifacts(run.info.run_id)} >= {"scores.parquet", "report.html"}
    # A restore-batch output as --pred: pairs through its results/ map of source -> output (names need not agree).
    batch = tmp_path / "batch"
    (batch / "images").mkdir(parents=True)
    results_rows = []
    for index, path in enumerate(sorted(pred.glob("*.png"))):
        (batch / "images" / f"out{index}~0123456789.png").write_bytes(path.read_bytes())
        results_rows.append({"source": str(tmp_path / "lq" / path.name), "output": f"images/out{index}~0123456789.png"})
    (batch / "results").mkdir()
    pq.write_table(pa.Table.from_pylist(results_rows), batch / "results" / "part-0.parquet")
    assert main(["eval", "score", "--pred", str(batch), "--gt", str(gt), "--output", str(tmp_path / "b"), *tracking]) == 0
    by_batch = pq.read_table(tmp_path / "b" / "scores.parquet").to_pylist()
    assert [row["case"] for row in by_batch] == ["hq0", "hq1", "hq2"] and all(row["output"].startswith(str(batch)) for row in by_batch)
    # Refused, naming what is wrong: a file without its pair; two files sharing a name; nothing scorable.
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(gt / "extra.png")
    assert main([*score, "--output", str(tmp_path / "x")]) == 2
    assert "1 only in --gt ['extra']" in capsys.readouterr().err
    (gt / "extra.png").unlink()
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(pred / "hq0.jpg")
    assert main([*score, "--output", str(tmp_path / "y")]) == 2
    assert "are both 'hq0'" in capsys.readouterr().err
    assert main(["eval", "score", "--pred", str(gt), "--output", str(tmp_path / "z"), *tracking]) == 2
    assert "no metric can be scored" in capsys.readouterr().err
    # On s3://: read there by the scoring actors, written there, and the MLflow run names the output and copies it in.
    from tests.conftest import moto_client

    (pred / "hq0.jpg").unlink()
    s3 = moto_client(moto_endpoint)
    s3.create_bucket(Bucket="eval")
    for side, folder in (("pred", pred), ("gt", gt)):
        for path in sorted(folder.glob("*.png")):
            s3.put_object(Bucket="eval", Key=f"{side}/{path.name}", Body=path.read_bytes())
    remote = ["eval", "score", "--pred", "s3://eval/pred", "--gt", "s3://eval/gt", "--convention", "basicsr", "--crop-border", "4",
              "--output", "s3://eval/scores", *tracking,
              "--set", f"storage.s3_endpoint_url={moto_endpoint}"]  # fmt: skip
    assert main(remote) == 0
    runs = client.search_runs([client.get_experiment_by_name("restoray-eval").experiment_id], "tags.`restoray.output` = 's3://eval/scores'")
    assert len(runs) == 1 and runs[0].data.metrics["psnr"] == pytest.approx(np.mean([row["psnr"] for row in rows]))
    assert {item.path for item in client.list_artifacts(runs[0].info.run_id)} >= {"scores.parquet", "report.html"}
    assert {"scores/scores.parquet", "scores/report.html", "scores/summary.json"} <= {
        key for key in (item["Key"] for item in s3.list_objects_v2(Bucket="eval", Prefix="scores/")["Contents"])}  # fmt: skip


def test_a_protocol_file_pairs_a_x4_layout_and_adds_noise_as_promptir(tmp_path, local_ray):  # noqa: F811
    from pipelines.evaluate import build_testset
    from restoration.errors import InputError
    from restoration.evaluation.protocols import load_protocol
    from runtime.config import StorageConfig

    rng = np.random.default_rng(2)
    data = tmp_path / "benchmarks"
    for folder in ("HR", "LR/X4", "BSD68"):
        (data / folder).mkdir(parents=True)
    for stem in ("0801", "0802"):  # DIV2K's names: 0801.png (HR) and 0801x4.png (LR, a quarter of the size)
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(data / "HR" / f"{stem}.png")
        Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(data / "LR" / "X4" / f"{stem}x4.png")
    Image.fromarray(np.full((48, 48, 3), 128, np.uint8)).save(data / "BSD68" / "flat.png")
    protocol_file = tmp_path / "mine.toml"
    protocol_file.write_text(
        'name = "mine"\ndescription = "DIV2K-style x4 pairs and BSD68 at sigma 25"\nkind = "paired"\nupscale = 4.0\n'
        '[[pairs]]\nname = "div2k"\nlq = "LR/X4"\nhq = "HR"\nlq_key = "(?P<key>.+)x4"\n'
        '[[pairs]]\nname = "bsd68-25"\nhq = "BSD68"\nnoise_sigma = 25\n'
        '[metrics]\nconvention = "basicsr"\ncrop_border = 4\n'
    )
    protocol = load_protocol(str(protocol_file))
    assert protocol.convention.name == "basicsr" and protocol.convention.crop_border == 4
    cases = build_testset(protocol, str(data), str(tmp_path / "t"), StorageConfig(), 1)
    names = [(case["case"], case["type"]) for case in cases]  # in the protocol's order of sets
    assert names == [("div2k/0801", "div2k"), ("div2k/0802", "div2k"), ("bsd68-25/flat", "bsd68-25")]
    lq = np.asarray(Image.open(tmp_path / "t" / "testset" / "lq" / "div2k" / "0801.png"))
    assert lq.shape == (16, 24, 3) and np.array_equal(lq, np.asarray(Image.open(data / "LR" / "X4" / "0801x4.png")))
    noisy = np.asarray(Image.open(tmp_path / "t" / "testset" / "lq" / "bsd68-25" / "flat.png")).astype(float)
    assert 22 < (noisy - 128).std() < 28  # PromptIR: clip(HQ + N(0, 25)), then uint8
    again = build_testset(protocol, str(data), str(tmp_path / "u"), StorageConfig(), 1)
    assert again == cases and (tmp_path / "u" / "testset" / "lq" / "bsd68-25" / "flat.png").read_bytes() == (
        tmp_path / "t" / "testset" / "lq" / "bsd68-25" / "flat.png").read_bytes()  # fmt: skip
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(data / "LR" / "X4" / "0802x4.png")
    with pytest.raises(InputError, match=r"div2k/0802: HQ is 96x64, LQ x 4 is 96x80"):
        build_testset(protocol, str(data), str(tmp_path / "v"), StorageConfig(), 1)
    protocol_file.write_text(protocol_file.read_text().replace("noise_sigma = 25", "noise = 25"))
    with pytest.raises(InputError, match=r"(?s)mine.toml.*pairs.1.noise"):
        load_protocol(str(protocol_file))
    with pytest.raises(InputError, match="no such file"):
        load_protocol(str(tmp_path / "absent.toml"))
    # The packaged real-world x4 layouts: RealSR (V3) keeps both sides in one folder per camera, DRealSR names differ
    # by a suffix.
    realsr, drealsr = tmp_path / "RealSR(V3)", tmp_path / "Test_x4"
    for high, low in ((realsr / "Canon/Test/4/Canon_001_HR.png", realsr / "Canon/Test/4/Canon_001_LR4.png"),
                      (realsr / "Nikon/Test/4/Nikon_050_HR.png", realsr / "Nikon/Test/4/Nikon_050_LR4.png"),
                      (drealsr / "test_HR/DSC_1454_x1.png", drealsr / "test_LR/DSC_1454_x4.png")):  # fmt: skip
        for path, size in ((high, (64, 96, 3)), (low, (16, 24, 3))):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(path)
    (realsr / "Canon/Test/4/Canon_001_LR3.png").write_bytes((realsr / "Canon/Test/4/Canon_001_LR4.png").read_bytes())  # x3: not a pair
    cases = build_testset(load_protocol("realsr-x4"), str(realsr), str(tmp_path / "r"), StorageConfig(), 1)
    assert [(case["case"], case["source"].rsplit("/", 1)[1]) for case in cases] == [
        ("canon/Canon_001", "Canon_001_LR4.png"), ("nikon/Nikon_050", "Nikon_050_LR4.png")]  # fmt: skip
    cases = build_testset(load_protocol("drealsr-x4"), str(drealsr), str(tmp_path / "d"), StorageConfig(), 1)
    assert [case["case"] for case in cases] == ["DSC_1454"] and load_protocol("drealsr-x4").upscale == 4


def test_abair_benchmarks_read_promptirs_test_layout_as_the_public_sets_name_their_files(tmp_path, local_ray):  # noqa: F811
    from pipelines.evaluate import build_testset
    from restoration.evaluation.protocols import load_protocol
    from runtime.config import StorageConfig

    rng = np.random.default_rng(3)
    data = tmp_path / "test"
    layout = {  # (folder, file name) of each side, as the sets ship
        "rain100l": (("derain/Rain100L/input", "rain-001.png"), ("derain/Rain100L/target", "norain-001.png")),
        "sots-outdoor": (("dehaze/input", "0001_0.8_0.2.jpg"), ("dehaze/target", "0001.png")),
        "gopro": (("deblur/input", "GOPR0384_11_00-000001.png"), ("deblur/target", "GOPR0384_11_00-000001.png")),
        "lolv1": (("enhance/input", "1.png"), ("enhance/target", "1.png")),
    }
    for sides in layout.values():
        for folder, name in sides:
            (data / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(data / folder / name)
    (data / "denoise" / "bsd68").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(data / "denoise" / "bsd68" / "test001.png")
    protocol = load_protocol("abair-benchmarks")
    assert protocol.convention.name == "promptir"
    cases = build_testset(protocol, str(data), str(tmp_path / "out"), StorageConfig(), 1)
    assert [case["case"] for case in cases] == [
        "rain100l/001", "sots-outdoor/0001", "bsd68-15/test001", "bsd68-25/test001", "bsd68-50/test001",
        "gopro/GOPR0384_11_00-000001", "lolv1/1",
    ]  # fmt: skip
    noise = {s: np.asarray(Image.open(tmp_path / "out" / "testset" / "lq" / f"bsd68-{s}" / "test001.png")).astype(float) for s in (15, 50)}
    hq = np.asarray(Image.open(data / "denoise" / "bsd68" / "test001.png")).astype(float)
    assert np.std(noise[15] - hq) < np.std(noise[50] - hq)  # each sigma its own noisy copy


def test_eval_with_an_index_evaluates_refir_and_reports_each_cases_reference(tmp_path, local_ray, shared_sample_index, capsys):  # noqa: F811
    import mlflow

    _, images, index = shared_sample_index()
    data = tmp_path / "hq"
    data.mkdir()
    for path in images[:2]:  # two of the indexed photos, small: each case's nearest reference is in the index
        Image.open(path).convert("RGB").resize((96, 64), Image.Resampling.BICUBIC).save(data / path.name)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    arguments = ["eval", "--protocol", "spire-parameterized", "--data", str(data), "--output", str(tmp_path / "r"), "--preset", "tiny",
                 "--index", str(index), "--steps", "1", "--set", "eval.prompt=a photo", "--set", "restore.min_similarity=-1",
                 "--set", f"mlflow.tracking_uri={tracking}", "--set", "restore_batch.num_cpus=0.5"]  # fmt: skip
    assert main(arguments) == 0
    rows = pq.read_table(tmp_path / "r" / "scores.parquet").to_pylist()
    indexed = {str(path) for path in images}
    assert len(rows) == 2 and all(row["references"] and row["references"].rsplit(" (", 1)[0] in indexed for row in rows)
    report = (tmp_path / "r" / "report.html").read_text()
    assert report.count("reference: ") == 2
    client = mlflow.MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("restoray-eval").experiment_id])
    assert run.data.params["index"] != "none" and run.data.params["convention"] == "refir, border crop 0"
