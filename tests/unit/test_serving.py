"""serving/ without Ray Serve running: auth, the job board, the deploy config, the request checks."""

from __future__ import annotations

import io
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import yaml
from PIL import Image

from restoray.config import load_config
from restoray.serve import CONFIG_HEADER, app_config
from serving.app import deploy_config
from serving.auth import UNNAMED, accepted_digests, check_bearer, digest
from serving.catalog import ModelCatalog, ModelRef, UnknownModel
from serving.config import AppConfig, ServeConfig
from serving.deployments import FreeSlotBatcher
from serving.jobs import JobBoard
from serving.requests import RequestError, RestoreRequest, check_request, form_request

REPO = Path(__file__).resolve().parents[2]


def test_bearer_tokens_401_without_403_wrong_and_accepted_from_env_and_file_with_their_names(tmp_path, monkeypatch):
    secret = tmp_path / "tokens"
    secret.write_text("from-file\n\n")
    monkeypatch.setenv("RESTORAY_SERVE_TOKENS", "alice:from-env, second")
    digests = accepted_digests(ServeConfig(token_file=str(secret)))
    assert digests == {digest("from-env"): "alice", digest("second"): UNNAMED, digest("from-file"): UNNAMED}
    assert check_bearer(None, digests) == (401, None)
    assert check_bearer("Basic abc", digests) == (401, None)
    assert check_bearer("Bearer wrong", digests) == (403, None)
    assert check_bearer("Bearer alice:from-env", digests) == (403, None)  # the name is not part of the token
    assert check_bearer("Bearer from-env", digests) == (None, digest("from-env"))
    assert check_bearer("bearer from-file", digests) == (None, digest("from-file"))
    monkeypatch.delenv("RESTORAY_SERVE_TOKENS")
    with pytest.raises(Exception, match="no token is set"):
        accepted_digests(ServeConfig())
    assert accepted_digests(ServeConfig(auth=False)) == {}


def test_job_board_owners_bounds_leases_expiry_and_a_restart_that_reads_its_jobs_back(tmp_path):
    import asyncio

    config = ServeConfig(max_pending_jobs=2, job_lease_s=0.2, job_ttl_s=60, jobs_kept=1).model_dump(mode="json")
    root = str(tmp_path / "jobs")

    async def scenario():
        board = JobBoard(root, config, {})
        assert (await board.create("a", "alice", 10))["state"] == "queued"
        assert await board.state("a", "bob") is None and await board.cancel("a", "bob") is None  # another token's job
        assert await board.create("b", "alice", 10) is not None
        assert await board.create("c", "alice", 10) is None  # max_pending_jobs unfinished: the caller answers 503
        assert await board.report({"a": (1, 10)}, ["b"]) == []
        assert (await board.state("a", "alice"))["step"] == 1
        assert (await board.cancel("a", "alice"))["state"] == "cancelled"
        assert await board.report({"a": (2, 10)}) == ["a"]  # the sampler learns it is over, and stops
        assert (await board.state("a", "alice"))["step"] == 1
        assert await board.set_state("a", "restoring") is False
        await board.renew(["b"])
        await asyncio.sleep(0.3)  # b's lease lapses (its ingress died); the board's own sweep marks it within a tick
        failed = await board.state("b", "alice")
        assert failed["state"] == "failed" and "no heartbeat" in failed["error"]["message"]
        # Admitted per token per minute.
        assert [await board.admit("alice", 2) for _ in range(3)][:2] == [0.0, 0.0]
        assert await board.admit("alice", 2) > 0 and await board.admit("bob", 2) == 0.0
        assert await board.create("d", "alice", 4) is not None
        board.store.write_result("d", b"pixels", {"format": "png"})
        await board.finish("d", {"format": "png"})
        return board

    board = asyncio.run(scenario())
    # jobs_kept=1: only the newest finished job is kept, with its result; the others' files are gone.
    assert sorted(board.jobs) == ["d"]
    assert sorted(p.name for p in (tmp_path / "jobs" / "state").iterdir()) == ["d.json"]

    async def restarted():
        again = JobBoard(root, config, {})  # a new board (Ray restarted it) on the same jobs_dir
        state = await again.state("d", "alice")
        assert state["state"] == "done" and state["step"] == 4
        assert again.store.read_result("d") == (b"pixels", {"format": "png"})
        again.jobs["d"]["expires"] = 0  # its time is up
        assert (await again.sweep())["expired"] == 1
        assert again.store.read_result("d") is None and await again.state("d", "alice") is None

    asyncio.run(restarted())


def test_models_are_served_by_name_only_and_aliases_pin_a_version(tmp_path):
    import mlflow

    tracking = f"sqlite:///{tmp_path / 'registry.db'}"
    client = mlflow.MlflowClient(tracking)
    client.create_registered_model("restorer")
    for _ in range(2):
        client.create_model_version("restorer", source=str(tmp_path))
    client.set_registered_model_alias("restorer", "champion", "2")
    config = AppConfig.model_validate(
        {
            "serve": {"weights": str(tmp_path / "model-a"), "models": {"b": "s3://bucket/b", "live": "models:/restorer@champion"}},
            "mlflow": {"tracking_uri": tracking},
        }
    )
    catalog = ModelCatalog(config)
    assert catalog.names() == ["b", "default", "live"]
    assert catalog.resolve(None) == ModelRef("default", str(tmp_path / "model-a"), None)
    assert catalog.resolve("live") == ModelRef("live", "models:/restorer/2", "2")
    for asked in ("/", "../", "s3://other-bucket/x", "tiny", "sdxl", "configs/presets/tiny.toml", str(tmp_path / "model-a")):
        with pytest.raises(UnknownModel, match="the models are b, default, live"):
            catalog.resolve(asked)
    # What a replica may load: the catalog's URIs, and versions of the registered model an alias names.
    assert catalog.allows("s3://bucket/b") and catalog.allows("models:/restorer/1")
    assert not catalog.allows("s3://bucket") and not catalog.allows("models:/other/1") and not catalog.allows("tiny")
    assert catalog.name_of("models:/restorer/2") == "live"
    client.set_registered_model_alias("restorer", "champion", "1")
    assert catalog.resolve("live").version == "2"  # pinned until ALIAS_REFRESH_S passes: one label, one version
    catalog._pinned.clear()
    assert catalog.resolve("live").version == "1"
    with pytest.raises(Exception, match="not a model name"):
        ServeConfig(models={"../x": "s3://b/x"})


def test_encoding_a_4096_square_image_leaves_the_event_loop_free(tmp_path):
    """The ingress's real app and encode path, with the model deployments replaced by a restore that returns a
    synthetic 4096² array at once (no restoration that size on 2 cores): /healthz answers while the PNG encodes."""
    import threading
    import time as clock
    import types

    import requests
    import uvicorn

    from restoray.serve import free_port
    from serving.api import build_api
    from serving.app import Ingress

    big = np.random.default_rng(0).integers(0, 255, (4096, 4096, 3), dtype=np.uint8)

    class Models:  # the parts of the ingress that would call Ray
        config = AppConfig.model_validate({"serve": {"auth": False}})
        digests: ClassVar[dict] = {}
        open_streams = 0
        metrics = types.SimpleNamespace(answered=lambda route, status: None)
        parse = Ingress.parse
        encoded = Ingress.encoded
        _encoded = staticmethod(Ingress._encoded)
        headers = staticmethod(Ingress.headers)

        async def restore(self, call):
            return {
                "image": big,
                "model": {"name": "default", "version": "x"},
                "seed": call.options.seed,
                "caption": None,
                "seconds": {"total": 0.0},
            }

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_api(Models()), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while not server.started:
        clock.sleep(0.05)
    finished: dict[str, float] = {}

    def restore():
        png = io.BytesIO()
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png, format="PNG")
        response = requests.post(f"{url}/v1/restore", files={"image": ("a.png", png.getvalue(), "image/png")}, data={"prompt": "a"})
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(response.content)).size == (4096, 4096)
        finished["restore"] = clock.monotonic()

    try:
        worker = threading.Thread(target=restore)
        worker.start()
        clock.sleep(0.5)  # the encode is under way (it takes seconds)
        started = clock.monotonic()
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
        finished["healthz"] = clock.monotonic()
        worker.join()
    finally:
        server.should_exit = True
        thread.join()
    assert finished["healthz"] < finished["restore"], "/healthz waited for the encode"
    print(f"/healthz during a 4096² PNG encode: {(finished['healthz'] - started) * 1000:.1f} ms")


def test_batches_form_when_the_model_is_free_one_model_at_a_time_skipping_callers_that_left():
    import asyncio

    async def scenario():
        ran: list[list[str]] = []
        release = asyncio.Event()

        async def run(items):
            ran.append(list(items))
            if len(ran) == 1:
                await release.wait()  # the first batch is still running while the others arrive
            if "boom" in items:
                raise ValueError("boom")
            return [item.upper() for item in items]

        batcher = FreeSlotBatcher(run, max_batch_size=3)
        lone = asyncio.create_task(batcher.submit("m1", "a"))
        for _ in range(3):  # the caller's task, then the drainer's
            await asyncio.sleep(0)
        assert ran == [["a"]]  # a lone request does not wait for company
        later = [asyncio.create_task(batcher.submit(key, item)) for key, item in
                 [("m1", "b"), ("m2", "x"), ("m1", "c"), ("m1", "d"), ("m1", "e"), ("m2", "boom")]]  # fmt: skip
        left = asyncio.create_task(batcher.submit("m1", "gone"))
        await asyncio.sleep(0)
        left.cancel()  # the client went away before its batch
        await asyncio.sleep(0)
        release.set()
        assert await lone == "A"
        results = await asyncio.gather(*later, return_exceptions=True)
        # m1's oldest three, then m2's (the oldest waiting), then the rest of m1; the cancelled caller is skipped.
        assert ran == [["a"], ["b", "c", "d"], ["x", "boom"], ["e"]], ran
        assert results[0] == "B" and results[3] == "D" and results[4] == "E"
        assert isinstance(results[1], ValueError) and isinstance(results[5], ValueError)  # the failed batch's callers

    asyncio.run(scenario())


def test_committed_serve_config_is_the_generated_one_and_serve_accepts_it():
    from ray.serve.schema import ServeDeploySchema

    generated = CONFIG_HEADER + yaml.safe_dump(deploy_config(app_config(load_config())), sort_keys=False)
    committed = (REPO / "serving" / "config.yaml").read_text()
    assert committed == generated, "serving/config.yaml is stale: run `restoray serve --write-config serving/config.yaml`"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(committed))
    application = schema.applications[0]
    assert application.import_path == "serving.app:app_builder"
    assert {d.name for d in application.deployments} == {"Ingress", "Restorer", "Captioner"}
    AppConfig.model_validate(application.args)


def test_request_checks_name_the_field():
    image = np.zeros((64, 64, 3), np.uint8)
    config = AppConfig()
    with pytest.raises(RequestError, match="steps") as refused:
        check_request(RestoreRequest(steps=101), image, [], config)
    assert refused.value.status == 422 and refused.value.field == "steps"
    with pytest.raises(RequestError, match="upscale: the output 32768x32768"):
        check_request(RestoreRequest(upscale=8), np.zeros((4096, 4096, 3), np.uint8), [], config)
    with pytest.raises(RequestError, match="references: auto needs a reference index"):
        check_request(RestoreRequest(references="auto"), image, "auto", config)
    parsed = check_request(form_request({"steps": "7", "tau_r": "0", "experts": "noise=1,blur=0.5", "seed": "9"}), image, [], config)
    assert parsed.sampler.steps == 7 and parsed.sampler.tau_r is None and parsed.options.seed == 9
    assert parsed.expert_weights == {"noise": 1.0, "blur": 0.5}
    preset = check_request(RestoreRequest(sampler="supir-paper", steps=3), image, [], config)
    assert preset.sampler.steps == 3
    with pytest.raises(RequestError, match="experts"):
        form_request({"experts": "noise=lots"})
