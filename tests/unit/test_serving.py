"""serving/ without Ray Serve running: auth, the job board, the deploy config, the request checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from restoray.config import load_config
from restoray.serve import CONFIG_HEADER, app_config
from serving.app import deploy_config
from serving.auth import accepted_digests, check_bearer, digest
from serving.config import AppConfig, ServeConfig
from serving.jobs import JobBoard
from serving.requests import RequestError, RestoreRequest, check_request, form_request

REPO = Path(__file__).resolve().parents[2]


def test_bearer_tokens_401_without_403_wrong_and_accepted_from_env_and_file(tmp_path, monkeypatch):
    secret = tmp_path / "tokens"
    secret.write_text("from-file\n\n")
    monkeypatch.setenv("RESTORAY_SERVE_TOKENS", "from-env, second")
    digests = accepted_digests(ServeConfig(token_file=str(secret)))
    assert sorted(digests) == sorted(digest(t) for t in ("from-env", "second", "from-file"))
    assert check_bearer(None, digests) == 401
    assert check_bearer("Basic abc", digests) == 401
    assert check_bearer("Bearer wrong", digests) == 403
    assert check_bearer("Bearer second", digests) is None
    assert check_bearer("bearer from-file", digests) is None
    monkeypatch.delenv("RESTORAY_SERVE_TOKENS")
    with pytest.raises(Exception, match="no token is set"):
        accepted_digests(ServeConfig())
    assert accepted_digests(ServeConfig(auth=False)) == []


def test_job_board_cancel_is_seen_by_the_next_step_and_old_jobs_are_dropped():
    board = JobBoard(kept=2)
    board.create("a", 10)
    assert board.progress("a", 1, 10) is False
    assert board.cancel("a")["state"] == "cancelled"
    assert board.progress("a", 2, 10) is True and board.state("a")["step"] == 1
    assert board.set_state("a", "restoring") is False
    for name in ("b", "c", "d"):
        board.create(name, 1)
        board.finish(name, {"image": name})
    assert board.state("a") is None and board.state("b") is None  # the oldest finished jobs beyond `kept`
    assert board.result("d") == {"image": "d"}


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
