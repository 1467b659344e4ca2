"""The HTTP surface on one app (FastAPI TestClient): contract fields, HTTP logits equal in-process
logits, every bad input a 4xx that says what was wrong (and the service answers afterwards), the
API key, body-size limits, metrics."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from inference_service.app import create_app
from protos import Array, ProjectionSpec, ScoreRequest
from tests.service.conftest import TASKS, TEXTS, Zoo

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def llama_client(zoo: Zoo) -> Iterator[TestClient]:
    settings = zoo.settings(
        "llama",
        api_key=KEY,
        max_rows=100,
        max_body_bytes=200_000,
        max_batch_tokens=256,
        max_projection_bytes=1_000_000,
    )
    with TestClient(create_app(settings, backend=zoo.backend("llama"))) as client:
        yield client


@pytest.fixture(scope="module")
def bert_client(zoo: Zoo) -> Iterator[TestClient]:
    with TestClient(create_app(zoo.settings("bert"), backend=zoo.backend("bert"))) as client:
        yield client


def _z(p: int = 3, d: int = 16, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(p, d)) * 3).astype(np.float32)


def _body(name: str = "llama", p: int = 3, d: int = 16, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "projection": {"seed": 11, "intrinsic_dim": d, "prompt_length": 6},
        "z": Array.from_numpy(_z(p, d)).model_dump(),
        "task": TASKS[name].model_dump(),
        "texts": TEXTS,
    }
    body.update(changes)
    return body


def _logits(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = response.json()
    assert set(data) == {"logits", "rows", "stats"}
    arr: np.ndarray = Array.model_validate(data["logits"]).numpy()
    return arr


def test_model_info_has_the_contract_fields(llama_client: TestClient, zoo: Zoo) -> None:
    info = llama_client.get("/v1/model", headers=AUTH).json()
    for key in (
        "model_id",
        "head",
        "hidden_size",
        "vocab_size",
        "max_length",
        "mask_token_id",
        "special_token_ids",
    ):
        assert key in info
    backend = zoo.backend("llama")
    assert info["head"] == "causal"
    assert info["hidden_size"] == 128 and info["vocab_size"] == backend.description.vocab_size
    assert info["mask_token_id"] is None
    assert info["special_token_ids"] == sorted(backend.codec.tokenizer.all_special_ids)
    assert info["max_rows"] == 100
    assert set(info) <= {*ModelInfoFields}


ModelInfoFields = (
    "model_id",
    "head",
    "hidden_size",
    "vocab_size",
    "max_length",
    "mask_token_id",
    "special_token_ids",
    "backend",
    "dtype",
    "max_rows",
    "input_handles",  # the lean link (POST /v1/inputs, /v1/score/handle): additive
)


def test_tokenize_returns_input_ids_only(bert_client: TestClient, zoo: Zoo) -> None:
    out = bert_client.post("/v1/tokenize", json={"texts": ["A great movie", ""]}).json()
    tok = zoo.backend("bert").codec.tokenizer
    assert out == {"input_ids": [tok("a great movie", add_special_tokens=False)["input_ids"], []]}


def test_http_logits_equal_in_process(llama_client: TestClient, zoo: Zoo) -> None:
    body = _body()
    over_http = _logits(llama_client.post("/v1/score", json=body, headers=AUTH))
    in_process = zoo.scorer("llama", max_batch_tokens=256).score(ScoreRequest.model_validate(body))
    assert np.abs(over_http - in_process.logits.numpy()).max() < 1e-5
    assert over_http.shape == (3, len(TEXTS), 2)


def test_zero_shot_and_input_ids(bert_client: TestClient) -> None:
    ids = bert_client.post("/v1/tokenize", json={"texts": TEXTS}).json()["input_ids"]
    by_ids = _logits(
        bert_client.post("/v1/score", json={"task": TASKS["bert"].model_dump(), "input_ids": ids})
    )
    by_text = _logits(
        bert_client.post("/v1/score", json={"task": TASKS["bert"].model_dump(), "texts": TEXTS})
    )
    assert by_ids.shape == (1, len(TEXTS), 2)
    np.testing.assert_array_equal(by_ids, by_text)


def _nan_z() -> dict[str, Any]:
    z = _z()
    z[1, 2] = np.nan
    return {"dtype": "float32", "shape": [3, 16], "data": base64.b64encode(z.tobytes()).decode()}


def _inf_embeds() -> dict[str, Any]:
    e = np.zeros((2, 6, 128), np.float32)
    e[0, 0, 0] = np.inf
    return {"dtype": "float32", "shape": [2, 6, 128], "data": base64.b64encode(e.tobytes()).decode()}


def _embeds(hidden: int) -> dict[str, Any]:
    return Array.from_numpy(np.zeros((2, 6, hidden), np.float32)).model_dump()


def _without(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in keys}


# (case, body changes, expected status, a phrase the detail must contain)
BAD: list[tuple[str, Callable[[], dict[str, Any]], int, str]] = [
    ("nan in z", lambda: _body(z=_nan_z()), 422, "NaN or Inf"),
    (
        "inf in prompt_embeds",
        lambda: _without(_body(prompt_embeds=_inf_embeds()), "z", "projection"),
        422,
        "NaN or Inf",
    ),
    (
        "wrong d",
        lambda: _body(projection={"seed": 1, "intrinsic_dim": 20, "prompt_length": 6}),
        422,
        "intrinsic_dim is 20",
    ),
    (
        "wrong hidden",
        lambda: _without(_body(prompt_embeds=_embeds(64)), "z", "projection"),
        400,
        "hidden size 64",
    ),
    (
        "id out of vocab",
        lambda: _without(_body(input_ids=[[5, 6], [7, 99999]]), "texts"),
        400,
        "input_ids[1][1] = 99999",
    ),
    ("negative id", lambda: _without(_body(input_ids=[[-1]]), "texts"), 400, "outside the vocabulary"),
    (
        "no {input}",
        lambda: _body(task={"template": "The sentiment is", "labels": ["a", "b"]}),
        422,
        "{input}",
    ),
    (
        "mask not at end",
        lambda: _body(task={"template": "{input} {mask} .", "labels": ["bad", "good"]}),
        400,
        "must end the template",
    ),
    ("empty labels", lambda: _body(task={"template": "{input}", "labels": []}), 422, "labels"),
    ("too many rows", lambda: _body(p=30), 400, "at most 100 rows"),
    ("too long", lambda: _body(texts=["word " * 600]), 400, "shorten it by"),
    (
        "prompt too long",
        lambda: _body(projection={"seed": 1, "intrinsic_dim": 16, "prompt_length": 600}),
        400,
        "shorten it by",
    ),
    (
        "projection too big",
        lambda: _body(projection={"seed": 1, "intrinsic_dim": 16, "prompt_length": 200}),
        400,
        "this service allows 1000000",
    ),
    ("z without projection", lambda: _without(_body(), "projection"), 422, "z and projection go together"),
    ("texts and ids", lambda: _body(input_ids=[[5]]), 422, "exactly one of input_ids or texts"),
    ("bad base64", lambda: _body(z={"dtype": "float32", "shape": [3, 16], "data": "@" * 256}), 422, "base64"),
    (
        "short data",
        lambda: _body(z={"dtype": "float32", "shape": [3, 16], "data": "AAAA"}),
        422,
        "needs 192 bytes",
    ),
    ("unknown field", lambda: _body(temperature=1.0), 422, "Extra inputs"),
    ("not json", lambda: {"__raw__": b"{not json"}, 422, "JSON"),
]


@pytest.mark.parametrize(("case", "make", "status", "phrase"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_helpful_4xx(
    llama_client: TestClient, case: str, make: Callable[[], dict[str, Any]], status: int, phrase: str
) -> None:
    body = make()
    if "__raw__" in body:
        r = llama_client.post(
            "/v1/score", content=body["__raw__"], headers={**AUTH, "content-type": "application/json"}
        )
    else:
        r = llama_client.post("/v1/score", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    text = detail if isinstance(detail, str) else " ".join(f"{e['loc']} {e['msg']}" for e in detail)
    assert phrase.lower() in text.lower(), text
    assert len(r.content) < 4000  # no echo of the (possibly huge) input
    # The service still answers, and still scores.
    assert llama_client.get("/healthz").status_code == 200
    assert _logits(llama_client.post("/v1/score", json=_body(p=1), headers=AUTH)).shape == (1, len(TEXTS), 2)


def test_mlm_template_needs_a_mask(bert_client: TestClient) -> None:
    r = bert_client.post(
        "/v1/score", json={"task": {"template": "{input} .", "labels": ["bad", "great"]}, "texts": ["x"]}
    )
    assert r.status_code == 400 and "{mask}" in r.json()["detail"]


def test_label_that_tokenises_to_nothing(bert_client: TestClient) -> None:
    # BERT's normaliser drops control characters: the label has no token at all.
    task = {"template": "{input} {mask}", "labels": ["bad", "\u0007"]}
    r = bert_client.post("/v1/score", json={"task": task, "texts": ["x"]})
    assert r.status_code == 400 and "tokenises to no tokens" in r.json()["detail"]
    assert (
        bert_client.post("/v1/score", json={"task": TASKS["bert"].model_dump(), "texts": ["x"]}).status_code
        == 200
    )


def test_api_key(llama_client: TestClient) -> None:
    assert llama_client.get("/v1/model").status_code == 401
    wrong = llama_client.get("/v1/model", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert llama_client.get("/v1/model", headers={"Authorization": KEY}).status_code == 401
    assert llama_client.post("/v1/score", json=_body()).status_code == 401
    assert llama_client.get("/v1/model", headers=AUTH).status_code == 200
    # Health and metrics stay open for probes.
    assert llama_client.get("/healthz").status_code == 200
    assert llama_client.get("/readyz").status_code == 200
    assert llama_client.get("/metrics").status_code == 200


def test_open_service_needs_no_key(bert_client: TestClient) -> None:
    assert bert_client.get("/v1/model").status_code == 200


def test_body_size_limit(llama_client: TestClient) -> None:
    big = _without(
        _body(prompt_embeds=Array.from_numpy(np.zeros((60, 6, 128), np.float32)).model_dump()),
        "z",
        "projection",
    )
    r = llama_client.post("/v1/score", json=big, headers=AUTH)
    assert r.status_code == 413 and "200000" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # streamed, no Content-Length
        for _ in range(30):
            yield b" " * 10_000

    r = llama_client.post("/v1/score", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413
    # Unauthenticated uploads are refused before the body is read.
    assert llama_client.post("/v1/score", json=big).status_code == 401
    assert llama_client.get("/v1/model", headers=AUTH).status_code == 200


def test_a_form_body_is_415_that_says_to_send_json(llama_client: TestClient) -> None:
    """Break seen to fail: without the guard's content-type check the answer is a 422."""
    body = json.dumps(_body()).encode()
    form = {**AUTH, "content-type": "application/x-www-form-urlencoded"}
    r = llama_client.post("/v1/score", content=body, headers=form)
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"], r.text
    assert (
        llama_client.post(
            "/v1/score", content=body, headers={**AUTH, "content-type": "application/json"}
        ).status_code
        == 200
    )


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def test_metrics_count(zoo: Zoo) -> None:
    app = create_app(zoo.settings("llama", max_batch_tokens=128), backend=zoo.backend("llama"))
    other = create_app(zoo.settings("llama"), backend=zoo.backend("llama"))  # its own registry
    with TestClient(app) as client, TestClient(other) as client2:
        for _ in range(2):
            assert client.post("/v1/score", json=_body(p=2)).status_code == 200
        assert client.post("/v1/score", json=_body(z=_nan_z())).status_code == 422
        client.get("/healthz")
        client.get("/nowhere")
        text = client.get("/metrics").text
        assert _metric(text, "fedbpt_requests_total", route="/v1/score", status="200") == 2
        assert _metric(text, "fedbpt_requests_total", route="/v1/score", status="422") == 1
        assert _metric(text, "fedbpt_requests_total", route="/healthz", status="200") == 1
        assert _metric(text, "fedbpt_requests_total", route="other", status="404") == 1
        assert _metric(text, "fedbpt_rows_scored_total") == 2 * 2 * len(TEXTS)
        assert _metric(text, "fedbpt_forward_batch_rows_count") >= 2
        assert _metric(text, "fedbpt_forward_batch_rows_sum") == 2 * 2 * len(TEXTS)
        assert _metric(text, "fedbpt_request_seconds_count", route="/v1/score") == 3
        assert "fedbpt_queue_depth 0.0" in text
        assert _metric(client2.get("/metrics").text, "fedbpt_rows_scored_total") == 0


def test_embedding_head_over_http(zoo: Zoo) -> None:
    """The real MiniLM behind the app: contract fields and a scored population."""
    with TestClient(create_app(zoo.settings("minilm"), backend=zoo.backend("minilm"))) as client:
        info = client.get("/v1/model").json()
        assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
        assert (info["head"], info["hidden_size"], info["vocab_size"], info["max_length"]) == (
            "embedding",
            384,
            30522,
            256,
        )
        body = _body(
            "minilm", projection=ProjectionSpec(seed=2, intrinsic_dim=16, prompt_length=10).model_dump()
        )
        logits = _logits(client.post("/v1/score", json=body))
        assert logits.shape == (3, len(TEXTS), 2)
        assert np.all(np.abs(logits) <= 20.0 + 1e-4)  # scale x cosine
        bad = client.post(
            "/v1/score", json=_body("minilm", task={"template": "{input} {mask}", "labels": ["a", "b"]})
        )
        assert bad.status_code == 400


def test_readyz_reports_a_failed_load(tmp_path: Any, zoo: Zoo) -> None:
    settings = zoo.settings("llama").model_copy(update={"model": str(tmp_path / "missing")})
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        body = copy.deepcopy(_body())
        for _ in range(100):
            r = client.get("/readyz")
            if "failed" in r.text:
                break
            time.sleep(0.05)
        assert r.status_code == 503 and "failed to load" in r.json()["detail"]
        refused = client.post("/v1/score", json=body)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"


def test_a_full_queue_is_503_with_retry_after(zoo: Zoo) -> None:
    """With the model queue at its limit (max_queue 1, one job holding the model thread), /v1/score
    answers 503 at once with a Retry-After header (what clients back off on) and scores again once
    the queue has room. Catches a queue that takes more than its limit (the request would wait
    for the held job instead) and a 503 without Retry-After."""
    app = create_app(zoo.settings("llama", max_queue=1), backend=zoo.backend("llama"))
    scheduler = app.state.service.scheduler
    gate = threading.Event()

    async def occupy() -> asyncio.Future[Any]:
        job = asyncio.ensure_future(scheduler.submit(lambda: gate.wait(60)))
        await asyncio.sleep(0)  # the job ran up to its queue slot: it counts against the limit
        return job

    async def result(job: asyncio.Future[Any]) -> Any:
        return await job

    with TestClient(app) as client:
        assert client.portal is not None
        job = client.portal.call(occupy)
        try:
            assert scheduler.depth == 1
            full = client.post("/v1/score", json=_body(p=1))
            assert full.status_code == 503, full.text
            assert full.headers["Retry-After"] == "1"
            assert "queue is full" in full.json()["detail"]
        finally:
            gate.set()
        assert client.portal.call(result, job) is True  # the held job itself was not disturbed
        assert scheduler.depth == 0
        assert _logits(client.post("/v1/score", json=_body(p=1))).shape == (1, len(TEXTS), 2)
