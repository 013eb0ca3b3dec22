"""The Serve application end to end on 127.0.0.1 (tiny preset): one service for the API, the bad requests, the load
and the web UI; a second, small-queued application next to it for backpressure and cancellation."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from restoray.serve import free_port, wait_ready
from tests.integration.test_build_dataset import local_ray  # noqa: F401  (the module's Ray instance)

TOKEN = "test-token-1"
OTHER_TOKEN = "other-token"
BURST_TOKEN = "burst-token"


@dataclass
class Running:
    url: str
    small_url: str  # the small-queued application (route prefix /small)
    root: Path
    samples: list[Path]

    def auth(self, **extra) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}", **extra}


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_image(size: int = 64, seed: int = 0) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def decoded(response: requests.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


@pytest.fixture(scope="module")
def service(shared_sample_index, local_ray, monkeypatch_module):  # noqa: F811
    import torch
    from ray import serve

    from restoration.restorer import Restorer
    from serving.app import build_app
    from serving.config import AppConfig

    # The sample corpus and its index from the session (built once, shared with test_index_build); the models beside
    # them, so `root.parent` is the one directory no answer may name.
    base, samples, index = shared_sample_index()
    root = base / "serving"
    root.mkdir()
    # Two versions of one preset: zero-initialised connectors, and the same with perturbed ones (at zero init an
    # adaptor changes nothing, so only the perturbed version can differ from the base).
    restorer = Restorer("tiny")
    restorer.save_pretrained(root / "model-a")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in restorer.model.connectors.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    restorer.save_pretrained(root / "model-b")
    # A third with ABAIR experts whose LoRA weights are perturbed too (zero-initialised experts change nothing).
    restorer.add_experts(["noise", "blur"])
    with torch.no_grad():
        for name, parameter in restorer.model.adaptor.named_parameters():
            if "lora" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    restorer.save_pretrained(root / "model-experts")

    monkeypatch_module.setenv("RESTORAY_SERVE_TOKENS", f"tester:{TOKEN},{OTHER_TOKEN},burst:{BURST_TOKEN}")
    port = free_port()
    base = {"preset": "tiny", "sampler": {"steps": 2}}
    limits = {"max_pixels_in": 512 * 512, "max_upload_bytes": 2 * 2**20, "max_steps": 100}
    main_app = AppConfig.model_validate(
        {
            **base,
            "serve": {
                "port": port,
                "weights": str(root / "model-a"),
                "models": {"b": str(root / "model-b"), "experts": str(root / "model-experts")},
                "index": str(index),
                "jobs_dir": str(root / "jobs"),
                "limits": limits,
                # Room for 16 clients: 4 in the batch, the rest queued.
                "restorer": {"num_cpus": 0.5, "max_ongoing_requests": 4, "max_queued_requests": 64},
            },
        }
    )
    small_app = AppConfig.model_validate(
        {
            **base,
            "serve": {
                "port": port,
                "weights": str(root / "model-a"),
                "jobs_dir": str(root / "jobs"),
                "job_lease_s": 4,
                "limits": {**limits, "requests_per_minute": 12},
                "retry_after_s": 3,
                "ingress": {"num_cpus": 0.05},
                "captioner": {"num_cpus": 0.05, "min_replicas": 0},  # every request here has a prompt
                "restorer": {"num_cpus": 0.1, "max_ongoing_requests": 1, "max_queued_requests": 1},
            },
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(main_app), name="restoray", route_prefix="/", blocking=False)
    serve.run(build_app(small_app), name="small", route_prefix="/small", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    wait_ready(f"{url}/small")
    yield Running(url, f"{url}/small", root, samples)
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def restore(service: Running, url: str | None = None, image: bytes | None = None, timeout: float = 120, **fields) -> requests.Response:
    fields = {"prompt": "a photo", **fields}
    headers = service.auth(**fields.pop("headers", {}))
    files = {"image": ("input.png", image if image is not None else noise_image(), "image/png")}
    return requests.post(f"{url or service.url}/v1/restore", files=files, data=fields, headers=headers, timeout=timeout)


def test_restore_returns_the_image_at_the_requested_size_and_names_the_model(service):
    response = restore(service, seed="3")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert decoded(response).shape == (64, 64, 3)
    assert response.headers["X-Restoray-Model"] == "default"  # the name, never the path
    assert len(response.headers["X-Restoray-Model-Version"]) == 12
    assert response.headers["X-Restoray-Seed"] == "3"
    upscaled = restore(service, upscale="2", output_format="jpeg")
    assert upscaled.status_code == 200, upscaled.text
    assert upscaled.headers["content-type"] == "image/jpeg"
    assert decoded(upscaled).shape == (128, 128, 3)


def test_same_seed_same_image_and_another_seed_another(service):
    first, again, other = (restore(service, seed=seed) for seed in ("5", "5", "6"))
    assert first.status_code == again.status_code == other.status_code == 200
    assert first.content == again.content
    assert not np.array_equal(decoded(first), decoded(other))


def test_two_model_versions_on_one_replica_share_one_sdxl_base(service):
    a = restore(service, seed="1", headers={"Accept": "application/json"})
    b = restore(service, seed="1", model="b", headers={"Accept": "application/json"})
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.headers["X-Restoray-Model-Version"] != b.headers["X-Restoray-Model-Version"]
    image_a, image_b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))) for r in (a, b))
    assert np.abs(image_a.astype(int) - image_b.astype(int)).max() > 0  # the perturbed connectors change the result
    # The model id may come as Serve's multiplexing header instead of the field: the same version answers.
    by_header = restore(service, seed="1", headers={"serve_multiplexed_model_id": "b"})
    assert by_header.headers["X-Restoray-Model"] == "b"
    assert by_header.headers["X-Restoray-Model-Version"] == b.headers["X-Restoray-Model-Version"]
    assert str(service.root.parent) not in a.text + b.text + json.dumps(dict(b.headers))  # no answer names a path
    listed = requests.get(f"{service.url}/v1/models", headers=service.auth(), timeout=60).json()
    assert {model["name"] for model in listed["models"]} == {"default", "b", "experts"}
    versions = dict(map(tuple, listed["replica"]["models"]))
    assert versions["b"] == b.headers["X-Restoray-Model-Version"] and versions["default"] == a.headers["X-Restoray-Model-Version"]
    assert listed["replica"]["sdxl_bases"] == 1


def test_abair_experts_are_chosen_per_request(service):
    model = "experts"
    noise, blur = (restore(service, seed="2", model=model, experts=experts) for experts in ("noise=1", "blur=1"))
    assert noise.status_code == blur.status_code == 200, (noise.text, blur.text)
    assert not np.array_equal(decoded(noise), decoded(blur))
    unknown = restore(service, model=model, experts="rain=1")
    assert unknown.status_code == 422 and "unknown experts" in unknown.json()["error"]


def test_references_auto_reports_what_the_index_returned(service):
    sample = service.samples[0].read_bytes()
    image = np.asarray(Image.open(io.BytesIO(sample)).convert("RGB").resize((96, 64)))
    response = restore(service, image=png(image), references="auto", min_similarity="-1", headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    body = response.json()
    retrieval = body["retrieval"]
    assert retrieval["k"] == 1 and not retrieval["fell_back"]
    assert len(retrieval["candidates"]) == 1 and -1 <= retrieval["candidates"][0]["similarity"] <= 1
    assert base64.b64decode(retrieval["candidates"][0]["thumbnail"])[:2] == b"\xff\xd8"
    assert body["references"][0]["source"] == retrieval["candidates"][0]["source"]
    # Above every similarity: nothing is used, and the answer says the image was restored without a reference.
    strict = restore(service, image=png(image), references="auto", min_similarity="1", headers={"Accept": "application/json"})
    assert strict.json()["retrieval"]["fell_back"] and strict.json()["references"] == []


def test_captioning_runs_on_the_captioner_when_no_prompt_is_given(service):
    response = requests.post(
        f"{service.url}/v1/restore",
        files={"image": ("input.png", noise_image(), "image/png")},
        headers=service.auth(Accept="application/json"),
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["captioned"] is True and isinstance(response.json()["caption"], str)


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def json_restore(service: Running, body: str | bytes, content_type: str = "application/json", headers=None) -> requests.Response:
    return requests.post(
        f"{service.url}/v1/restore", data=body, headers={**service.auth(), "Content-Type": content_type, **(headers or {})}, timeout=60
    )


def test_bad_requests_get_4xx_naming_the_problem_and_the_replica_keeps_serving(service):
    valid = base64.b64encode(noise_image()).decode()
    image = noise_image()
    truncated = image[: len(image) // 2]

    def chunked(data: bytes):
        for start in range(0, len(data), 65536):
            yield data[start : start + 65536]

    cases = [
        ("not an image", lambda: restore(service, image=b"plain text, not pixels"), 415, "image"),
        ("truncated", lambda: restore(service, image=truncated), 422, "truncated"),
        ("1x1", lambda: restore(service, image=png(np.zeros((1, 1, 3), np.uint8))), 422, "smaller than"),
        ("decompression bomb", lambda: restore(service, image=png_header(40000, 40000)), 413, "too_large"),
        ("over the pixel limit", lambda: restore(service, image=png(np.zeros((600, 600, 3), np.uint8))), 413, "too_large"),
        ("NaN steps", lambda: json_restore(service, f'{{"image": "{valid}", "steps": NaN}}'), 422, "steps"),
        ("negative steps", lambda: restore(service, steps="-3"), 422, "steps"),
        ("10^9 steps", lambda: restore(service, steps=str(10**9)), 422, "steps"),
        ("NaN cfg", lambda: json_restore(service, f'{{"image": "{valid}", "cfg": NaN}}'), 422, "cfg"),
        ("negative cfg", lambda: restore(service, cfg="-1"), 422, "cfg"),
        ("10^9 cfg", lambda: restore(service, cfg="1e9"), 422, "cfg"),
        ("100k-character prompt", lambda: restore(service, prompt="x" * 100_000), 422, "prompt"),
        ("wrong content type", lambda: json_restore(service, b"steps=2", content_type="text/plain"), 415, "Content-Type"),
        ("malformed JSON", lambda: json_restore(service, '{"image": "abc", '), 400, "JSON"),
        ("malformed base64", lambda: json_restore(service, json.dumps({"image": "not base64!"})), 422, "base64"),
        ("unknown field", lambda: json_restore(service, json.dumps({"image": valid, "stepz": 3})), 422, "stepz"),
        ("unknown sampler", lambda: restore(service, sampler="fastest"), 422, "sampler"),
        ("unknown model", lambda: restore(service, model="missing"), 404, "the models are b, default, experts"),
        ("body over the limit", lambda: restore(service, image=b"\0" * (3 * 2**20)), 413, "limit"),
        (
            "streamed body over the limit",
            lambda: requests.post(
                f"{service.url}/v1/restore",
                data=chunked(b"\0" * (3 * 2**20)),
                headers={**service.auth(), "Content-Type": "application/json"},
            ),
            413,
            "limit",
        ),
        ("missing token", lambda: requests.post(f"{service.url}/v1/restore", files={"image": ("a.png", image)}), 401, "token"),
        (
            "wrong token",
            lambda: requests.post(f"{service.url}/v1/restore", files={"image": ("a.png", image)}, headers={"Authorization": "Bearer nope"}),
            403,
            "token",
        ),
    ]
    for name, send, status, words in cases:
        response = send()
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        assert words in response.json()["error"], (name, response.json())
        after = restore(service)
        assert after.status_code == 200, (f"after {name}", after.text)
    assert requests.get(f"{service.url}/healthz", timeout=10).status_code == 200  # open, without a token
    assert requests.get(f"{service.url}/openapi.json", timeout=10).json()["paths"]["/v1/restore"]["post"]["requestBody"]


def test_model_ids_naming_paths_buckets_or_presets_are_404_and_the_default_model_still_serves(service):
    before = requests.get(f"{service.url}/v1/models", headers=service.auth(), timeout=60).json()["replica"]
    asked = ["/", "../", "s3://other-bucket/x", "tiny", "sdxl", "configs/presets/tiny.toml", str(service.root / "model-b")]
    for model in asked:
        for response in (restore(service, model=model), restore(service, headers={"serve_multiplexed_model_id": model})):
            assert response.status_code == 404, (model, response.status_code, response.text[:300])
            body = response.json()
            assert body["field"] == "model" and "the models are b, default, experts" in body["error"] and body["request_id"]
            assert str(service.root.parent) not in response.text
    after = requests.get(f"{service.url}/v1/models", headers=service.auth(), timeout=60).json()["replica"]
    assert after["models"] == before["models"] and after["sdxl_bases"] == 1  # nothing loaded, nothing evicted
    assert restore(service).headers["X-Restoray-Model"] == "default"


def test_a_burst_over_the_queue_or_the_rate_gets_only_200_503_429_with_retry_after(service):
    image = noise_image(128)

    def one(_):
        return restore(service, url=service.small_url, image=image, steps="12", headers={"Authorization": f"Bearer {BURST_TOKEN}"})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16)))
    statuses = [response.status_code for response in responses]
    assert 503 in statuses and 200 in statuses and 429 in statuses, statuses
    assert all(status in (200, 503, 429) for status in statuses), statuses
    busy = next(response for response in responses if response.status_code == 503)
    assert busy.headers["Retry-After"] == "3"
    limited = next(response for response in responses if response.status_code == 429)
    assert 1 <= int(limited.headers["Retry-After"]) <= 60 and "12 restores per minute" in limited.json()["error"]


def test_cancelling_a_job_stops_it_and_frees_the_replica(service):
    image = noise_image(256)
    job_id = start_job(service, service.small_url, image, steps=100)
    deadline = time.monotonic() + 120
    while (state := requests.get(f"{service.small_url}/v1/jobs/{job_id}", headers=service.auth(), timeout=10).json())["step"] < 2:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    cancelled = requests.delete(f"{service.small_url}/v1/jobs/{job_id}", headers=service.auth(), timeout=10)
    assert cancelled.json()["state"] == "cancelled"
    # The small application's one Restorer slot serves the next request only once the job has let go of it.
    after = restore(service, url=service.small_url)
    assert after.status_code == 200, after.text
    final = requests.get(f"{service.small_url}/v1/jobs/{job_id}", headers=service.auth(), timeout=10).json()
    assert final["state"] == "cancelled", final
    # From the replica: its sampler ran fewer steps than asked (the board stops counting at the cancel, so its
    # step would be below 100 even if every step ran).
    from ray import serve

    ran = serve.get_deployment_handle("Restorer", app_name="small").job_steps.remote(job_id).result(timeout_s=60)
    assert ran is not None and 2 <= ran < 100, ran
    assert requests.get(f"{service.small_url}/v1/jobs/{job_id}/result", headers=service.auth(), timeout=10).status_code == 409


def test_a_client_that_goes_away_stops_its_restoration_and_frees_the_replica(service):
    def cancelled() -> int:
        models = requests.get(f"{service.small_url}/v1/models", headers=service.auth(), timeout=60)
        return models.json()["replica"]["cancelled"]

    before = cancelled()
    with pytest.raises(requests.exceptions.ReadTimeout):
        restore(service, url=service.small_url, image=noise_image(256), steps="100", timeout=1.5)
    deadline = time.monotonic() + 120
    while cancelled() == before:  # the sampler saw the flag Serve's cancellation set, and stopped
        assert time.monotonic() < deadline, "the abandoned restoration was not cancelled"
        time.sleep(0.1)
    assert restore(service, url=service.small_url).status_code == 200


def test_a_finished_job_reports_its_steps_and_serves_its_result(service):
    job_id = start_job(service, service.url, noise_image(), steps=6)
    seen = set()
    for _ in range(600):
        state = requests.get(f"{service.url}/v1/jobs/{job_id}", headers=service.auth(), timeout=10).json()
        seen.add(state["state"])
        if state["state"] in ("done", "failed"):
            break
        time.sleep(0.02)
    assert state["state"] == "done" and state["step"] == state["total"] == 6, state
    result = requests.get(f"{service.url}/v1/jobs/{job_id}/result", headers=service.auth(), timeout=10)
    assert result.status_code == 200 and decoded(result).shape == (64, 64, 3)
    assert result.headers["X-Restoray-Model"] == "default"
    assert requests.get(f"{service.url}/v1/jobs/nope", headers=service.auth(), timeout=10).status_code == 404
    # A job belongs to the token that created it: to another token it does not exist.
    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result", f"/v1/jobs/{job_id}/events"):
        assert requests.get(f"{service.url}{path}", headers=other, timeout=10).status_code == 404, path
    assert requests.delete(f"{service.url}/v1/jobs/{job_id}", headers=other, timeout=10).status_code == 404


def events(response: requests.Response) -> list[tuple[str, dict]]:
    """(id, data) of each server-sent event of a finished stream."""
    found = []
    for block in response.text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "data" in fields:
            found.append((fields["id"], json.loads(fields["data"])))
    return found


def start_job(service, url: str, image: bytes, steps: int) -> str:
    """POST /v1/jobs with a prompt (no captioning): 202 and the job's id."""
    job = requests.post(
        f"{url}/v1/jobs",
        files={"image": ("input.png", image, "image/png")},
        data={"prompt": "a photo", "steps": str(steps)},
        headers=service.auth(),
        timeout=60,
    )
    assert job.status_code == 202, job.text
    return job.json()["id"]


def test_job_events_stream_increasing_steps_and_resume_after_the_last_event_id(service):
    job_id = start_job(service, service.url, noise_image(128), steps=30)
    stream = requests.get(f"{service.url}/v1/jobs/{job_id}/events", headers=service.auth(), timeout=300)
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    seen = events(stream)
    steps = [state["step"] for _, state in seen]
    assert seen[-1][1]["state"] == "done" and steps[-1] == 30, seen
    assert steps == sorted(steps) and any(0 < step < 30 for step in steps), steps  # live progress, in order
    ids = [int(event_id) for event_id, _ in seen]
    assert ids == sorted(set(ids))
    # A client that lost the stream resumes after the last id it saw: only newer events come.
    middle = seen[len(seen) // 2][0]
    resumed = events(
        requests.get(f"{service.url}/v1/jobs/{job_id}/events", headers={**service.auth(), "Last-Event-ID": middle}, timeout=60)
    )
    assert resumed and all(int(event_id) > int(middle) for event_id, _ in resumed) and resumed[-1][1]["state"] == "done"


def test_a_job_outlives_its_ingress_replica(service):
    """Killing the ingress replica that runs a job leaves the job readable, failed with a reason within its lease."""
    import ray

    job_id = start_job(service, service.small_url, noise_image(256), steps=100)
    deadline = time.monotonic() + 120
    while requests.get(f"{service.small_url}/v1/jobs/{job_id}", headers=service.auth(), timeout=10).json()["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    replicas = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve" and actor["name"].startswith("SERVE_REPLICA::small#Ingress#")  # Serve's replica actor names
    ]
    assert len(replicas) == 1, replicas
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while True:  # Serve starts a new ingress replica; the board answers through it
        try:
            state = requests.get(f"{service.small_url}/v1/jobs/{job_id}", headers=service.auth(), timeout=10)
            if state.status_code == 200 and state.json()["state"] in ("done", "failed"):
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the job stayed unfinished after its ingress replica died"
        time.sleep(0.5)
    assert state.json()["state"] == "failed" and "heartbeat" in state.json()["error"]["message"], state.json()
    # The Restorer learns the job is over at its next progress report and stops: the next request is served.
    assert restore(service, url=service.small_url).status_code == 200


def test_sixteen_clients_for_twelve_seconds_get_no_5xx(service, capsys):
    image = noise_image()
    stop_at = time.monotonic() + 12  # a bounded load; bench/serving.py measures longer runs
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        session = requests.Session()
        count = 0
        while time.monotonic() < stop_at and count < 1000:  # bounded in time and in count
            started = time.monotonic()
            response = session.post(
                f"{service.url}/v1/restore",
                files={"image": ("input.png", image, "image/png")},
                data={"prompt": "a photo", "seed": str(seed * 1000 + count)},
                headers=service.auth(),
                timeout=120,
            )
            with lock:
                latencies.append(time.monotonic() - started)
                statuses.append(response.status_code)
            count += 1

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses and all(status == 200 for status in statuses), sorted(set(statuses))
    p50, p99 = np.percentile(latencies, [50, 99])
    # Serve's own Prometheus metrics stay exposed (Ray's export on this node) and count this traffic.
    from restoray.serve import metrics_url

    deadline = time.monotonic() + 90
    wanted = ("ray_serve_deployment_request_counter", "ray_restoray_requests", "ray_restoray_batch_size", "ray_restoray_restore_seconds")
    while missing := [name for name in wanted if name not in (exported := requests.get(metrics_url(), timeout=10).text)]:
        assert time.monotonic() < deadline, f"not in Ray's metrics export: {missing}"
        time.sleep(2)
    counted = [line for line in exported.splitlines() if line.startswith("ray_restoray_requests")]
    assert any('application="restoray"' in line and 'route="/v1/restore"' in line for line in counted), counted
    with capsys.disabled():
        print(f"\nload: 16 clients x 12 s: {len(statuses)} requests, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")


def test_web_ui_restores_an_image_in_headless_chromium(service, tmp_path):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "the UI test needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # No name resolves but the service's: a page that needed a CDN would stay blank.
    offline = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900", offline):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=DriverService(driver_path), options=options)
    try:
        wait = WebDriverWait(browser, 120)
        browser.get(service.url + "/")
        wait.until(ready.visibility_of_element_located((By.ID, "token")))  # auth is on: the UI asks for the token
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "save-token").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#phrases button")) > 1)
        picture = tmp_path / "input.png"
        picture.write_bytes(noise_image(96))
        browser.find_element(By.ID, "file").send_keys(str(picture))
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("4")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model-name option")) == 3)
        Select(browser.find_element(By.ID, "model-name")).select_by_value("b")
        Select(browser.find_element(By.ID, "output-format")).select_by_value("jpeg")
        browser.find_element(By.ID, "cfg").send_keys("3")
        # The progress bar follows the job's event stream: record every value it takes.
        browser.execute_script(
            "window.seen = []; new MutationObserver(() => window.seen.push(+document.getElementById('progress').value))"
            ".observe(document.getElementById('progress'), {attributes: true});"
        )
        browser.find_element(By.ID, "restore").click()
        wait.until(ready.visibility_of_element_located((By.ID, "result")))
        wait.until(lambda b: b.find_element(By.ID, "after").get_attribute("src").startswith("data:image/jpeg;base64,"))
        assert browser.find_element(By.ID, "progress").get_attribute("value") == "4"
        assert "done" in browser.find_element(By.ID, "status").text
        assert "model b" in browser.find_element(By.ID, "details").text
        seen = browser.execute_script("return window.seen;")
        assert seen and max(seen) == 4 and seen == sorted(seen), seen
        clip_before = browser.find_element(By.ID, "after-clip").value_of_css_property("clip-path")
        slider = browser.find_element(By.ID, "slider")
        for _ in range(20):
            slider.send_keys(Keys.ARROW_RIGHT)
        assert int(slider.get_attribute("value")) > 50
        assert browser.find_element(By.ID, "after-clip").value_of_css_property("clip-path") != clip_before
        assert browser.find_element(By.ID, "download").get_attribute("href").startswith("data:image/jpeg;base64,")
        shot = tmp_path / "ui.png"
        browser.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0
        # The API docs render from the service's own assets.
        browser.get(service.url + "/docs")
        wait.until(lambda b: "restoray" in b.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text)
        assert browser.find_elements(By.CSS_SELECTOR, ".opblock")  # the operations are listed
        browser.get(service.url + "/redoc")
        wait.until(lambda b: any("restoray" in h.text for h in b.find_elements(By.TAG_NAME, "h1")))
    finally:
        browser.quit()
