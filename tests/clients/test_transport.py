"""Retries against a real (stand-in) HTTP server that fails, then recovers; 4xx that cannot be
fixed by retrying; and the client command exiting non-zero with a clear message."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from fed_clients.model_api import ModelService
from fed_clients.transport import Conflict, FatalServiceError, JsonService, RetryPolicy, ServiceUnavailable
from fedbpt_cli.procs import fedbpt_command, free_port
from protos import ModelInfo
from tests.clients.conftest import StandIn

INFO = ModelInfo(
    model_id="stand-in", head="mlm", hidden_size=8, vocab_size=100, max_length=64,
    mask_token_id=4, special_token_ids=[0, 1, 2, 3, 4],
).model_dump()  # fmt: skip
FAST = RetryPolicy(total_s=20.0, initial_s=0.05, max_backoff_s=0.3)


def _http(url: str, retry: RetryPolicy = FAST) -> JsonService:
    return JsonService("model service", url, token="k", timeout_s=5, retry=retry)


def test_retries_503_then_succeeds(
    stand_in: Callable[..., StandIn], caplog: pytest.LogCaptureFixture
) -> None:
    server = stand_in().start()
    server.script.on("/v1/model", (503, {"detail": "loading"}), (503, {"detail": "loading"}), (200, INFO))
    with caplog.at_level(logging.WARNING), _http(server.url) as http:
        info = ModelService(http).info()
        assert info.model_id == "stand-in"
        assert server.script.hits["/v1/model"] == 3
        assert http.traffic.calls == 3
        assert http.traffic.bytes_received > len(b'{"detail":"loading"}') * 2
    assert sum("HTTP 503" in r.getMessage() for r in caplog.records) == 2


def test_429_honours_retry_after(stand_in: Callable[..., StandIn]) -> None:
    """The wait before the retry is at least the Retry-After the service asked for (0.25 s), not
    the policy's own backoff (at most 0.05 s here). Read from what the client asks its sleep for,
    not from a clock. Catches a client that ignores Retry-After."""
    server = stand_in().start()
    server.script.on("/v1/model", (429, {"detail": "slow down"}, {"Retry-After": "0.25"}), (200, INFO))
    waits: list[float] = []
    with JsonService(
        "model service", server.url, token="k", timeout_s=5, retry=FAST, sleep=waits.append
    ) as http:
        assert ModelService(http).info().model_id == "stand-in"
    assert len(waits) == 1 and waits[0] >= 0.25, waits
    assert server.script.hits["/v1/model"] == 2


def test_rides_out_a_service_that_is_down_then_comes_up(stand_in: Callable[..., StandIn]) -> None:
    server = stand_in()
    server.script.on("/v1/model", (200, INFO))
    starter = server.start_later(1.0)  # nothing listens on the port for a second: connection refused
    with _http(server.url) as http:
        assert ModelService(http).info().vocab_size == 100
    starter.join()


def test_gives_up_after_the_retry_budget(stand_in: Callable[..., StandIn]) -> None:
    server = stand_in().start()
    server.script.on("/v1/model", (502, {"detail": "bad gateway"}))
    policy = RetryPolicy(total_s=0.6, initial_s=0.05, max_backoff_s=0.1)
    with _http(server.url, policy) as http, pytest.raises(ServiceUnavailable, match="bad gateway"):
        ModelService(http).info()
    assert server.script.hits["/v1/model"] >= 3


@pytest.mark.parametrize("status", [401, 403, 404, 422])
def test_unfixable_4xx_fails_at_once_with_the_detail(stand_in: Callable[..., StandIn], status: int) -> None:
    server = stand_in().start()
    server.script.on("/v1/model", (status, {"detail": f"nope {status}"}))
    with (
        _http(server.url) as http,
        pytest.raises(FatalServiceError, match=f"HTTP {status}: nope {status}") as caught,
    ):
        ModelService(http).info()
    assert caught.value.status == status
    assert server.script.hits["/v1/model"] == 1


def test_409_is_a_conflict_not_a_retry(stand_in: Callable[..., StandIn]) -> None:
    server = stand_in().start()
    server.script.on("/v1/runs/r/rounds/0/updates", (409, {"detail": "round 0 is closed"}))
    with _http(server.url) as http, pytest.raises(Conflict) as caught:
        http.request("POST", "/v1/runs/r/rounds/0/updates", content=b"{}")
    assert caught.value.detail == "round 0 is closed"
    assert server.script.hits["/v1/runs/r/rounds/0/updates"] == 1


def test_unreadable_answer_is_fatal(stand_in: Callable[..., StandIn]) -> None:
    server = stand_in().start()
    server.script.on("/v1/model", (200, {"model_id": "x"}))
    with _http(server.url) as http, pytest.raises(FatalServiceError, match="not a valid ModelInfo"):
        ModelService(http).info()


def test_client_command_exits_non_zero_on_a_refused_token(
    stand_in: Callable[..., StandIn], sst2_file: Path
) -> None:
    coordinator = stand_in().start()
    coordinator.script.on("/v1/whoami", (401, {"detail": "unknown client token"}))
    model = stand_in().start()
    model.script.on("/v1/model", (200, INFO))
    argv = fedbpt_command(
        "client", "--coordinator", coordinator.url, "--token", "wrong", "--model-endpoint", model.url,
        "--data", str(sst2_file),
    )  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "coordinator: GET /v1/whoami was refused with HTTP 401: unknown client token" in done.stderr
    assert coordinator.script.hits["/v1/whoami"] == 1  # not retried


def test_client_command_explains_missing_settings_and_bad_data(tmp_path: Path) -> None:
    done = subprocess.run(
        fedbpt_command("client", "--data", "x.jsonl"), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "missing --coordinator, --token, --model-endpoint" in done.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n')
    argv = fedbpt_command(
        "client", "--coordinator", "http://127.0.0.1:9", "--token", "t", "--model-endpoint", "http://127.0.0.1:9",
        "--data", str(bad),
    )  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "bad.jsonl:1: missing column(s) ['label']" in done.stderr


def test_client_command_without_whoami_needs_a_run_id(
    stand_in: Callable[..., StandIn], sst2_file: Path
) -> None:
    coordinator = stand_in().start()  # answers 404 to every path: no /v1/whoami here
    model = stand_in().start()
    model.script.on("/v1/model", (200, INFO))
    argv = fedbpt_command(
        "client", "--coordinator", coordinator.url, "--token", "t", "--model-endpoint", model.url,
        "--data", str(sst2_file),
    )  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the coordinator has no GET /v1/whoami; pass the run id (--run-id or FEDBPT_RUN_ID)" in done.stderr


def test_a_failed_replica_hands_over_to_the_next_at_once(stand_in: Callable[..., StandIn]) -> None:
    """Replicas: a refused connection and a 503 each move the request to the next URL without a
    wait; the replica that answered stays current for later requests. Catches a client that waits
    out its backoff on a dead replica, or goes back to it on the next call."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    busy, live = stand_in().start(), stand_in().start()
    busy.script.on("/v1/model", (503, {"detail": "overloaded"}))
    live.script.on("/v1/model", (200, INFO))
    waits: list[float] = []
    with JsonService(
        "model service", dead, token="k", timeout_s=5, retry=FAST, sleep=waits.append,
        alternates=(busy.url, live.url),
    ) as http:  # fmt: skip
        assert ModelService(http).info().model_id == "stand-in"
        assert http.current_url == live.url and waits == []
        ModelService(http).info()
    assert (busy.script.hits["/v1/model"], live.script.hits["/v1/model"]) == (1, 2)


def test_when_every_replica_fails_the_backoff_applies_between_rounds_of_them(
    stand_in: Callable[..., StandIn],
) -> None:
    """Both replicas 503: one wait per pass over both, and the retry budget still ends it."""
    a, b = stand_in().start(), stand_in().start()
    for s in (a, b):
        s.script.on("/v1/model", (503, {"detail": "down"}))
    waits: list[float] = []
    policy = RetryPolicy(total_s=0.5, initial_s=0.05, max_backoff_s=0.1)
    with (
        JsonService("model service", a.url, retry=policy, sleep=waits.append, alternates=(b.url,)) as http,
        pytest.raises(ServiceUnavailable, match="down"),
    ):
        ModelService(http).info()
    hits = a.script.hits["/v1/model"] + b.script.hits["/v1/model"]
    assert len(waits) >= 1 and hits == 2 * len(waits) + 2  # two tries per wait, the last pass unwaited
    assert abs(a.script.hits["/v1/model"] - b.script.hits["/v1/model"]) <= 1


def test_sites_spread_over_the_replicas_and_keep_their_first_choice() -> None:
    from fed_clients.settings import ClientSettings

    urls = "http://a:1, http://b:2,http://c:3"
    firsts = {ClientSettings(model_endpoint=urls, token=f"token-{k}").model_endpoints()[0] for k in range(30)}
    assert firsts == {"http://a:1", "http://b:2", "http://c:3"}
    one = ClientSettings(model_endpoint=urls, token="token-7")
    assert one.model_endpoints() == ClientSettings(model_endpoint=urls, token="token-7").model_endpoints()
    assert sorted(one.model_endpoints()) == ["http://a:1", "http://b:2", "http://c:3"]
    assert ClientSettings(model_endpoint=urls).model_endpoints() == ["http://a:1", "http://b:2", "http://c:3"]
    assert ClientSettings(model_endpoint="http://x:9/").model_endpoints() == ["http://x:9/"]
