"""The service as a real process: ``fedbpt serve-model`` under uvicorn, a client over loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running
from protos import Array, ScoreRequest
from protos.scoring import DEFAULT_INIT_TEXT
from tests.service.conftest import TASKS, TEXTS, Zoo

KEY = "process-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _serve(zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> tuple[ManagedProcess, str]:
    port = free_port()
    argv = fedbpt_command(
        "serve-model",
        "--model",
        str(zoo.path("llama")),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-batch-tokens",
        "512",
        "--threads",
        "1",
        "--log-level",
        "warning",
    )
    log = tmp_path_factory.mktemp("server") / "serve-model.log"
    proc = ManagedProcess("serve-model", argv, log, env={"FEDBPT_API_KEY": KEY})
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = _serve(zoo, tmp_path_factory)
    with running(proc, ready_url=f"{url}/readyz", timeout=120):
        yield url


def _request(p: int, texts: list[str]) -> ScoreRequest:
    z = (np.random.default_rng(p).normal(size=(p, 16)) * 3).astype(np.float32)
    return ScoreRequest.model_validate(
        {
            "projection": {"seed": 5, "intrinsic_dim": 16, "prompt_length": 8},
            "z": Array.from_numpy(z).model_dump(),
            "task": TASKS["llama"].model_dump(),
            "texts": texts,
        }
    )


def test_client_over_loopback_gets_the_in_process_logits(server: str, zoo: Zoo) -> None:
    request = _request(4, TEXTS)
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as client:
        info = client.get("/v1/model").json()
        assert info["head"] == "causal" and info["model_id"] == str(zoo.path("llama"))
        r = client.post(
            "/v1/score", content=request.model_dump_json(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 200, r.text
        remote = Array.model_validate(r.json()["logits"]).numpy()
        assert client.post("/v1/tokenize", json={"texts": ["a great movie"]}).json()["input_ids"] == [
            zoo.backend("llama").codec.encode_inputs(["a great movie"])[0]
        ]
    local = zoo.scorer("llama", max_batch_tokens=512).score(request).logits.numpy()
    assert remote.shape == (4, len(TEXTS), 2)
    assert np.abs(remote - local).max() < 1e-5


def test_key_is_enforced_over_http(server: str) -> None:
    assert httpx.get(f"{server}/v1/model").status_code == 401
    assert httpx.get(f"{server}/v1/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server}/healthz").status_code == 200


def test_healthz_answers_while_a_long_score_runs(server: str) -> None:
    long_texts = [f"{TEXTS[i % len(TEXTS)]} , number {i} of the long list" for i in range(300)]
    request = _request(24, long_texts)
    result: dict[str, int] = {}

    def score() -> None:
        r = httpx.post(
            f"{server}/v1/score",
            content=request.model_dump_json(),
            headers={**AUTH, "content-type": "application/json"},
            timeout=300,
        )
        result["status"] = r.status_code

    worker = threading.Thread(target=score)
    worker.start()
    try:
        # Wait until the model thread is busy with this job.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "fedbpt_jobs_running 1.0" in httpx.get(f"{server}/metrics").text:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the score job never started")
        health = httpx.get(f"{server}/healthz", timeout=30)
        still_running = worker.is_alive()
        assert health.status_code == 200
        # Answered while the score was in progress: the event loop is not blocked by the model.
        assert still_running
    finally:
        worker.join(timeout=300)
    assert result.get("status") == 200


def test_a_model_that_does_not_load_fails_the_command(tmp_path: Path) -> None:
    argv = fedbpt_command("serve-model", "--model", str(tmp_path / "missing"), "--port", str(free_port()))
    proc = ManagedProcess("bad-model", argv, tmp_path / "bad.log").start()
    try:
        assert proc.wait(timeout=120) != 0
    finally:
        proc.stop()
    assert "cannot load" in proc.log_tail()


def _state0(url: str, init_text: str | None) -> np.ndarray:
    """Logits of z = 0 (the prompt is p0 alone) for a projection starting from ``init_text``
    (None: BBT's placeholders)."""
    body = _request(1, TEXTS).model_dump(mode="json")
    body["z"] = Array.from_numpy(np.zeros((1, 16), np.float32)).model_dump()
    if init_text is None:
        body["projection"]["init"] = "placeholder"
    else:
        body["projection"]["init_text"] = init_text
    r = httpx.post(f"{url}/v1/score", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return Array.model_validate(r.json()["logits"]).numpy()


def test_p0_is_the_same_in_two_service_processes(
    server: str, zoo: Zoo, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Same projection spec -> same p0 on every replica: a second process scores z = 0 exactly as
    the first, for the default init text and for BBT's placeholders, and the two p0 differ."""
    proc, other = _serve(zoo, tmp_path_factory)
    with running(proc, ready_url=f"{other}/readyz", timeout=120):
        for init_text in (DEFAULT_INIT_TEXT, None):
            np.testing.assert_array_equal(_state0(other, init_text), _state0(server, init_text))
    assert np.abs(_state0(server, DEFAULT_INIT_TEXT) - _state0(server, None)).max() > 1e-4
