"""`restoray restore-batch` on local Ray (tiny preset): outputs named after the sources, results and rejects, a run
stopped by the test-only fault and resumed (the same outputs, nothing twice), a finished job a no-op."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import DataBuildConfig, RestoreBatchConfig
from pipelines.restore_batch import restore_batch
from restoration.settings import RestoreConfig, SamplerConfig
from restoray.cli import main
from tests.integration.test_build_dataset import local_ray  # noqa: F401  (the module's Ray instance)


def corpus(root):
    rng = np.random.default_rng(0)
    (root / "nested").mkdir(parents=True)
    for index in range(5):
        size = (64, 48) if index % 2 == 0 else (48, 64)  # two working sizes: batched and alone
        folder = root / "nested" if index == 4 else root
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"photo{index}.png")
    (root / "broken.png").write_bytes(b"not an image at all")
    return root


def results(output) -> list[dict]:
    return pq.read_table(output / "results").to_pylist()


def test_restore_batch_stops_resumes_and_names_outputs_after_sources(tmp_path, local_ray):  # noqa: F811
    source = corpus(tmp_path / "corpus")
    output = tmp_path / "out"
    config = RestoreBatchConfig(batch_size=2, max_rows_per_shard=1, num_cpus=0.5)
    data = DataBuildConfig.model_validate({"source": {"read_parallelism": 4}})
    args = (str(source), str(output), config, data, "tiny", SamplerConfig(steps=1), RestoreConfig(seed=3))
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Exception, match="fail_after_rows"):
        patch.setenv("RESTORAY_FAULTS", "restore.fail_after_rows=1")
        restore_batch(*args, prompt="a photo")
    time.sleep(2)  # write tasks of the aborted run still in flight finish their renames
    first = {row["source"]: (output / row["output"]).read_bytes() for row in results(output)}
    assert 0 < len(first) < 5
    summary = restore_batch(*args, prompt="a photo")
    assert summary.sources_in == 6 and summary.restored == 5 and summary.rejected_by_reason == {"not_image": 1}
    assert summary.restored_now == 5 - len(first)  # what the first run finished was not restored again
    rows = results(output)
    assert sorted(row["source"] for row in rows) == sorted({row["source"] for row in rows})  # nothing twice
    assert {row["output"] for row in rows} == {f"images/photo{i}.png" for i in range(4)} | {"images/nested/photo4.png"}
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
    assert len(results(output)) == 5


def test_restore_batch_refuses_bad_input_before_work(tmp_path, local_ray, capsys):  # noqa: F811
    source = corpus(tmp_path / "corpus")
    assert main(["restore-batch", "--input", str(source), "--output", str(source)]) == 2
    assert "--output must differ from --input" in capsys.readouterr().err
    assert main(["restore-batch", "--input", str(source), "--output", str(tmp_path / "o"), "--references", "auto"]) == 2
    assert "needs --index" in capsys.readouterr().err
    assert main(["restore-batch", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o2")]) == 2
