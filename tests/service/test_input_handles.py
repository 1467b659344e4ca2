"""The lean link on one app (FastAPI TestClient): ``POST /v1/inputs`` registers tokenised inputs,
``POST /v1/score/handle`` scores against the handle. Logits equal the stateless ``/v1/score``'s;
the cache evicts (404, then a new registration works), expires, holds its byte bound, keys its
entries by the caller's API key, and bad input is a 4xx that changes nothing.

Each test names the deliberate break of the code it was seen to fail on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from inference_service.app import create_app
from protos import Array, InputsRegistration, inputs_handle
from protos.frames import PACKED_IDS, SCORE_FRAME, decode_score_frame
from protos.inputs import PackedIds, flatten_inputs
from tests.service.conftest import TASKS, Zoo
from tests.service.test_heads import SAME_ROW

KEY_A, KEY_B = "key-of-site-a", "key-of-site-b"
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}
PROJECTION = {"seed": 11, "intrinsic_dim": 16, "prompt_length": 6}


def _client(zoo: Zoo, name: str, **settings: Any) -> TestClient:
    return TestClient(create_app(zoo.settings(name, **settings), backend=zoo.backend(name)))


@pytest.fixture(scope="module")
def bert(zoo: Zoo) -> Iterator[TestClient]:
    with _client(zoo, "bert", api_key=KEY_A, api_keys=[KEY_B]) as client:
        yield client


def _ids(client: TestClient, texts: list[str]) -> list[list[int]]:
    answer = client.post("/v1/tokenize", json={"texts": texts}, headers=AUTH_A)
    assert answer.status_code == 200, answer.text
    ids: list[list[int]] = answer.json()["input_ids"]
    return ids


TEXTS = [
    "a great movie",
    "it was awful and bad , really the worst film of the year",
    "fine",
    "the story of the characters is funny and sad at the same time , not good but not bad",
    "terrible",
    "not funny , sad and bad",
]


def _registration(ids: list[list[int]], vocab: int = 1000) -> dict[str, Any]:
    return InputsRegistration.pack(ids, vocab).model_dump()


def _register(client: TestClient, ids: list[list[int]], auth: dict[str, str] = AUTH_A) -> str:
    answer = client.post("/v1/inputs", json=_registration(ids), headers=auth)
    assert answer.status_code == 200, answer.text
    handle: str = answer.json()["handle"]
    return handle


def _prompt(name: str = "bert", p: int = 4, seed: int = 0, **extra: Any) -> dict[str, Any]:
    z = (np.random.default_rng(seed).normal(size=(p, 16)) * 3).astype(np.float32)
    return {
        "projection": PROJECTION,
        "z": Array.from_numpy(z).model_dump(),
        "task": TASKS[name].model_dump(),
        **extra,
    }


def _logits(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    arr: np.ndarray = Array.model_validate(response.json()["logits"]).numpy()
    return arr


def _score(client: TestClient, handle: str, auth: dict[str, str] = AUTH_A, **extra: Any) -> Any:
    return client.post(
        "/v1/score/handle", json={**_prompt(**extra), "parts": [{"handle": handle}]}, headers=auth
    )


def _stateless(client: TestClient, ids: list[list[int]], **extra: Any) -> np.ndarray:
    return _logits(client.post("/v1/score", json={**_prompt(**extra), "input_ids": ids}, headers=AUTH_A))


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_handle_logits_equal_stateless_logits(zoo: Zoo, name: str) -> None:
    """The same inputs through a handle and through ``/v1/score``: identical logits (the same
    rows in the same batches), also with the template perturbation; a handle of a subset of the
    inputs scores its rows as the full stateless call did, within SAME_ROW (other batches).
    Break seen to fail: ``StoredInputs.rows`` handing back the inputs shifted by one
    (``zip(bounds[1:], bounds[2:] + [bounds[-1]])``)."""
    with _client(zoo, name) as client:
        ids = _ids(client, TEXTS)
        handle = _register(client, ids)
        assert handle == inputs_handle(*flatten_inputs(ids))  # content-addressed: the client knows it
        by_handle = _logits(
            client.post("/v1/score/handle", json={**_prompt(name), "parts": [{"handle": handle}]})
        )
        stateless = _stateless(client, ids, name=name)
        assert by_handle.shape == (4, len(TEXTS), 2)
        np.testing.assert_array_equal(by_handle, stateless)
        template = {"rate": 0.5, "seed": 7}
        perturbed = client.post(
            "/v1/score/handle",
            json={**_prompt(name), "parts": [{"handle": handle, "perturb_template": template}]},
        )
        np.testing.assert_array_equal(
            _logits(perturbed), _stateless(client, ids, name=name, perturb_template=template)
        )
        subset = _register(client, ids[2:5])
        part = _logits(client.post("/v1/score/handle", json={**_prompt(name), "parts": [{"handle": subset}]}))
        np.testing.assert_allclose(part, stateless[:, 2:5], **SAME_ROW)
        # Several parts in one call: each part's logits as its own call, side by side along B.
        parts = [{"handle": handle}, {"handle": handle, "perturb_template": template}, {"handle": subset}]
        joined = client.post("/v1/score/handle", json={**_prompt(name), "parts": parts})
        assert joined.json()["rows"] == 4 * (2 * len(TEXTS) + 3)
        np.testing.assert_array_equal(
            _logits(joined), np.concatenate([by_handle, _logits(perturbed), part], axis=1)
        )


def test_eviction_and_expiry_answer_404_and_registering_again_works(zoo: Zoo) -> None:
    """A cache that holds one input set: registering B evicts A, A's handle is then a 404 that
    says to register again, and after registering A again its logits are the first ones exactly.
    An entry unused for ``input_ttl_s`` is a 404 too.
    Break seen to fail: ``InputStore.put`` not evicting (``while False and ...``): A stays, two
    entries are held (over the bound) and A's handle still scores."""
    with _client(zoo, "bert", input_cache_bytes=1000, input_ttl_s=100) as client:
        store = client.app.state.service.inputs  # type: ignore[attr-defined]
        ids = _ids(client, TEXTS)
        a, b = ids[:3], ids[3:]
        handle_a = _register(client, a)
        first = _logits(client.post("/v1/score/handle", json={**_prompt(), "parts": [{"handle": handle_a}]}))
        handle_b = _register(client, b)
        assert len(store) == 1 and store.bytes <= 1000
        gone = client.post("/v1/score/handle", json={**_prompt(), "parts": [{"handle": handle_a}]})
        assert gone.status_code == 404 and "register the inputs again" in gone.json()["detail"]
        assert _register(client, a) == handle_a
        np.testing.assert_array_equal(
            _logits(client.post("/v1/score/handle", json={**_prompt(), "parts": [{"handle": handle_a}]})),
            first,
        )
        # Expiry: a clock past the TTL drops the idle entry.
        now = store.clock()
        store.clock = lambda: now + 101
        assert (
            client.post("/v1/score/handle", json={**_prompt(), "parts": [{"handle": handle_a}]}).status_code
            == 404
        )
        assert len(store) == 0 and store.bytes == 0
        assert handle_b != handle_a


def test_the_cache_stays_within_its_byte_bound(zoo: Zoo) -> None:
    """300 registrations of random input sets of 1 to 40 inputs (2 to 60 ids each) into a
    20,000-byte cache: after every one, the bytes held (recounted from the entries' arrays) equal
    the store's own count and the /metrics gauge, never exceed the bound, and the newest set is
    always kept; older ones were evicted (the count of evictions matches).
    Break seen to fail: ``InputStore._drop`` not subtracting the dropped entry's bytes (the count
    drifts from the entries' real size, and the cache empties itself to fit)."""
    bound = 20_000
    rng = np.random.default_rng(3)
    with _client(zoo, "bert", input_cache_bytes=bound) as client:
        store = client.app.state.service.inputs  # type: ignore[attr-defined]
        vocab = client.get("/v1/model").json()["vocab_size"]
        for i in range(300):
            sets = [
                rng.integers(0, vocab, size=int(rng.integers(2, 61))).tolist()
                for _ in range(int(rng.integers(1, 41)))
            ]
            handle = _register(client, sets)
            held = sum(int(e.ids.nbytes + e.offsets.nbytes) + 512 for e in store._entries.values())
            assert held == store.bytes <= bound, (i, held, store.bytes)
            assert ("", handle) in store._entries
        metrics = client.get("/metrics").text
        assert f"fedbpt_input_cache_bytes {float(store.bytes)}" in metrics
        evicted = next(
            line
            for line in metrics.splitlines()
            if line.startswith('fedbpt_input_cache_evictions_total{reason="capacity"}')
        )
        assert float(evicted.split()[-1]) == 300 - len(store)
        # The ids are kept in the smallest dtype that holds them (this vocabulary fits uint16).
        assert all(e.ids.dtype == np.uint16 for e in store._entries.values())


def test_one_key_cannot_read_or_probe_another_keys_inputs(bert: TestClient) -> None:
    """Two keys: B scoring A's handle gets the same 404 as for a handle nobody registered (the
    detail differs only by the handle); B registering the same inputs gets its own entry, and A's
    is untouched; no key or a wrong key is 401 on both routes.
    Break seen to fail: the cache keyed by the handle alone (``key = ("", handle)`` in ``put`` and
    ``get``): B then scores A's inputs (200)."""
    store = bert.app.state.service.inputs  # type: ignore[attr-defined]
    ids = _ids(bert, TEXTS[:3])
    handle = _register(bert, ids, AUTH_A)
    assert _score(bert, handle, AUTH_A).status_code == 200
    foreign = _score(bert, handle, AUTH_B)
    unknown_handle = "0" * 64
    unknown = _score(bert, unknown_handle, AUTH_B)
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["detail"].replace(handle, "H") == unknown.json()["detail"].replace(
        unknown_handle, "H"
    )
    before = len(store)
    assert _register(bert, ids, AUTH_B) == handle  # the same content, the same handle ...
    assert len(store) == before + 1  # ... stored for B on its own
    np.testing.assert_array_equal(
        _logits(_score(bert, handle, AUTH_B)), _logits(_score(bert, handle, AUTH_A))
    )
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert bert.post("/v1/inputs", json=_registration(ids), headers=headers).status_code == 401
        assert _score(bert, handle, headers).status_code == 401


def _bad_registrations(ids: list[list[int]], vocab: int) -> dict[str, tuple[dict[str, Any], int]]:
    good = _registration(ids)
    flat, lengths = flatten_inputs(ids)

    def arr(a: Any, dtype: str) -> dict[str, Any]:
        return Array.from_numpy(np.asarray(a), dtype).model_dump()  # type: ignore[arg-type]

    return {
        "id outside the vocabulary": ({**good, "ids": arr(np.r_[flat[:-1], vocab], "int32")}, 400),
        "lengths not adding up": (
            {**good, "lengths": arr(np.r_[lengths[:-1], lengths[-1] + 1], "int32")},
            422,
        ),
        "an empty input": ({**good, "lengths": arr(np.r_[lengths, 0], "int32")}, 422),
        "float ids": ({**good, "ids": arr(flat, "float32")}, 422),
        "2-D ids": ({**good, "ids": arr(flat.reshape(1, -1), "int32")}, 422),
        "int64 lengths": ({**good, "lengths": arr(lengths, "int64")}, 422),
        "no lengths": ({"ids": good["ids"]}, 422),
        "an unknown field": ({**good, "texts": ["x"]}, 422),
        "bad base64": (
            {**good, "ids": {**good["ids"], "data": "!!!!" * (len(good["ids"]["data"]) // 4)}},
            422,
        ),
    }


def test_bad_input_is_a_clear_4xx_and_changes_nothing(zoo: Zoo) -> None:
    """Every malformed registration or handle call is a 4xx with a detail, the cache's entries and
    bytes are as before, and the service scores afterwards; a set larger than the whole cache is
    413; a service with ``input_cache_bytes=0`` says so in /v1/model and answers 404.
    Break seen to fail: the vocabulary check moved after ``state.inputs.put`` (the out-of-vocab
    registration still answers 400, but its ids are stored)."""
    with _client(zoo, "bert", input_cache_bytes=3000) as client:
        store = client.app.state.service.inputs  # type: ignore[attr-defined]
        vocab = client.get("/v1/model").json()["vocab_size"]
        ids = _ids(client, TEXTS)
        handle = _register(client, ids[:2])
        state = (dict(store._entries), store.bytes)
        for what, (body, status) in _bad_registrations(ids, vocab).items():
            answer = client.post("/v1/inputs", json=body)
            assert answer.status_code == status, (what, answer.text)
            assert answer.json()["detail"], what
            assert (dict(store._entries), store.bytes) == state, what
        outside = client.post(
            "/v1/inputs", json=_bad_registrations(ids, vocab)["id outside the vocabulary"][0]
        )
        assert (
            "outside the vocabulary" in outside.json()["detail"]
            and f"input {len(ids) - 1}" in outside.json()["detail"]
        )
        big = client.post("/v1/inputs", json=_registration([[5] * 2000]))
        assert big.status_code == 413 and "/v1/score" in big.json()["detail"]
        bad_calls = {
            "a malformed handle": ({**_prompt(), "parts": [{"handle": "not-a-handle"}]}, 422),
            "z of the wrong d": (
                {
                    **_prompt(),
                    "parts": [{"handle": handle}],
                    "projection": {**PROJECTION, "intrinsic_dim": 8},
                },
                422,
            ),
            "input_ids beside the handle": (
                {**_prompt(), "parts": [{"handle": handle}], "input_ids": [[5]]},
                422,
            ),
            "no handle": (_prompt(), 422),
            "an unknown handle": ({**_prompt(), "parts": [{"handle": "f" * 64}]}, 404),
            "an unknown handle beside a known one": (
                {**_prompt(), "parts": [{"handle": handle}, {"handle": "e" * 64}]},
                404,
            ),
            "no parts": ({**_prompt(), "parts": []}, 422),
            "too many parts": ({**_prompt(), "parts": [{"handle": handle}] * 9}, 422),
        }
        for what, (body, status) in bad_calls.items():
            answer = client.post("/v1/score/handle", json=body)
            assert answer.status_code == status, (what, answer.text)
            assert (dict(store._entries), store.bytes) == state, what
        np.testing.assert_array_equal(
            _logits(client.post("/v1/score/handle", json={**_prompt(), "parts": [{"handle": handle}]})),
            _stateless(client, ids[:2]),
        )
    with _client(zoo, "bert", input_cache_bytes=0) as off:
        assert off.get("/v1/model").json()["input_handles"] is False
        assert off.post("/v1/inputs", json=_registration(ids)).status_code == 404
        assert (
            off.post("/v1/score/handle", json={**_prompt(), "parts": [{"handle": handle}]}).status_code == 404
        )


def test_the_service_counts_body_bytes_per_route(bert: TestClient) -> None:
    """``fedbpt_request_bytes`` / ``fedbpt_response_bytes`` add up the bodies of each route: a
    handle call's request is its prompt part only, far smaller than the stateless body.
    Break seen to fail: the guard not counting response bodies (``send_counted`` without the
    ``http.response.body`` branch)."""

    def counted(kind: str, route: str) -> float:
        prefix = f'fedbpt_{kind}_bytes_total{{route="{route}"}}'
        lines = [x for x in bert.get("/metrics").text.splitlines() if x.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0

    ids = _ids(bert, TEXTS * 20)
    handle = _register(bert, ids)
    sent_before, got_before = counted("request", "/v1/score/handle"), counted("response", "/v1/score/handle")
    body = {**_prompt(), "parts": [{"handle": handle}]}
    answer = bert.post("/v1/score/handle", json=body, headers=AUTH_A)
    assert answer.status_code == 200
    assert counted("request", "/v1/score/handle") - sent_before == len(answer.request.content)
    assert counted("response", "/v1/score/handle") - got_before == len(answer.content)
    stateless = bert.post("/v1/score", json={**_prompt(), "input_ids": ids}, headers=AUTH_A)
    assert len(stateless.request.content) > 2 * len(answer.request.content)


def test_a_client_that_asks_gets_the_logits_as_a_binary_frame(bert: TestClient) -> None:
    """``Accept: application/vnd.fedbpt.score-frame`` on both score routes: the frame's logits are
    the JSON answer's, bit for bit, without base64's third more bytes; without it, or with any other type,
    JSON as before. Break seen to fail: ``_answer`` sending the frame to every caller (the JSON
    answers' Content-Type)."""
    frame = {**AUTH_A, "Accept": f"{SCORE_FRAME}, application/json;q=0.5"}
    ids = _ids(bert, TEXTS)
    handle = _register(bert, ids)
    for route, extra in (
        ("/v1/score", {"input_ids": ids}),
        ("/v1/score/handle", {"parts": [{"handle": handle}]}),
    ):
        body = {**_prompt(), **extra}
        as_json = bert.post(route, json=body, headers=AUTH_A)
        assert as_json.headers["content-type"] == "application/json"
        assert bert.post(route, json=body, headers={**AUTH_A, "Accept": "*/*"}).headers["content-type"] == (
            "application/json"
        )
        as_frame = bert.post(route, json=body, headers=frame)
        assert as_frame.status_code == 200
        assert as_frame.headers["content-type"] == SCORE_FRAME
        decoded = decode_score_frame(as_frame.content)
        assert decoded.logits.numpy().tobytes() == _logits(as_json).tobytes()
        assert decoded.rows == as_json.json()["rows"]
        raw = decoded.logits.numpy().nbytes  # the frame saves base64's third at least
        assert len(as_json.content) - len(as_frame.content) >= 4 * -(-raw // 3) - raw
    # A bad request is still a JSON 4xx, whatever the client accepts.
    refused = bert.post("/v1/score", json={**_prompt(), "input_ids": [[10**6]]}, headers=frame)
    assert refused.status_code == 400 and "vocabulary" in refused.json()["detail"]


def test_a_client_that_asks_gets_token_ids_packed(bert: TestClient) -> None:
    """``Accept: application/vnd.fedbpt.packed-ids+json`` on ``/v1/tokenize``: the same ids as the
    JSON lists, as one flat array of the smallest integer dtype and the lengths (an empty text is a
    length of 0), in fewer bytes. Break seen to fail: packing the ids as int64 whatever the
    vocabulary (``PackedIds.pack`` without ``ids_dtype``)."""
    texts = [*TEXTS * 10, ""]
    as_json = bert.post("/v1/tokenize", json={"texts": texts}, headers=AUTH_A)
    packed = bert.post("/v1/tokenize", json={"texts": texts}, headers={**AUTH_A, "Accept": PACKED_IDS})
    assert as_json.headers["content-type"] == "application/json"
    assert packed.headers["content-type"] == PACKED_IDS
    ids = PackedIds.model_validate_json(packed.content)
    assert ids.input_ids() == as_json.json()["input_ids"]
    assert ids.lengths.numpy()[-1] == 0
    assert ids.ids.dtype == "uint16"  # the test vocabulary is below 65,536
    assert len(packed.content) < len(as_json.content)
