"""The client's lean link against real ``fedbpt serve-model`` processes (tiny random BERT): it
registers each input set once and scores against the handle by default, gets the stateless path's
logits, re-registers after the service evicted its inputs, and falls back to ``/v1/score`` where the
service keeps no inputs. What went over the wire is read from a relay in front of the service.

Each test names the deliberate break of the client it was seen to fail on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fed_clients.data import load_labeled_texts
from fed_clients.inputs import EncodedSplit, encode_split, input_budget
from fed_clients.model_api import ModelService
from fed_clients.perturb import Perturber
from fed_clients.presets import ResolvedTask, resolve_task
from fed_clients.training import make_score_fn, train_locally
from fed_clients.transport import JsonService, RetryPolicy
from fedbpt_cli.procs import running
from protos import Array, GlobalState, InputsRegistration, ProjectionSpec
from tests.clients.conftest import SST2_SAMPLE, Relay, _serve, write_jsonl

PROJECTION = ProjectionSpec(seed=7, intrinsic_dim=16, prompt_length=4)


def _service(url: str, handles: bool = True) -> ModelService:
    http = JsonService("model service", url, timeout_s=120, retry=RetryPolicy(total_s=30, initial_s=0.1))
    return ModelService(http, input_handles=handles)


@pytest.fixture(scope="module")
def small_url(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A service whose input cache holds one half of the sample's inputs at a time."""
    log = tmp_path_factory.mktemp("serve-small") / "serve-model.log"
    proc, url = _serve(tiny_bert, log, "--input-cache-bytes", "1000")
    with running(proc, ready_url=f"{url}/readyz", timeout=180):
        yield url


@pytest.fixture(scope="module")
def off_url(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A service that keeps no inputs (as one from before the lean link: stateless only)."""
    log = tmp_path_factory.mktemp("serve-off") / "serve-model.log"
    proc, url = _serve(tiny_bert, log, "--input-cache-bytes", "0")
    with running(proc, ready_url=f"{url}/readyz", timeout=180):
        yield url


@pytest.fixture(scope="module")
def task(model_url: str) -> ResolvedTask:
    return resolve_task("sst2", _service(model_url).info().head)


@pytest.fixture(scope="module")
def split(model_url: str, task: ResolvedTask, tmp_path_factory: pytest.TempPathFactory) -> EncodedSplit:
    model = _service(model_url)
    path = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", SST2_SAMPLE)
    return encode_split(model, load_labeled_texts(path), task, input_budget(model, task, 4, 32))


def _state(d: int = 16) -> GlobalState:
    return GlobalState(mean=Array.from_numpy(np.zeros(d)), sigma=1.0, cov=Array.from_numpy(np.ones(d)))


def test_a_round_through_handles_equals_the_stateless_round_with_fewer_bytes(
    model_url: str, task: ResolvedTask, split: EncodedSplit, relay: Callable[[str], Relay]
) -> None:
    """A local round (4 generations, perturbation on) through the handle path and through the
    stateless path: the same local mean bit for bit (the same rows in the same calls). Over the
    wire, the handle client registered the clean and the perturbed set once each, made every
    score call against a handle and sent fewer bytes (its own counters and the relay agree).
    Break seen to fail: ``ModelService._handle_for`` without its memo (``if False and handle in
    self._registered``): every call registers its inputs again."""
    network = relay(model_url)
    lean, stateless = _service(network.url), _service(model_url, handles=False)
    info = lean.info()
    assert info.input_handles and stateless.info() == info
    perturbed = Perturber(info.vocab_size, tuple(info.special_token_ids), 0.5).copy(
        split.input_ids, 1, 0, "c"
    )
    results = {}
    for name, model in (("lean", lean), ("stateless", stateless)):
        before = model.traffic.copy()
        fn = make_score_fn(model, task.spec, PROJECTION)
        local = train_locally(fn, _state(), split.input_ids, split.labels, 5, 4, 1234, perturbed=perturbed)
        results[name] = (local, model.traffic.since(before))
    (lean_round, lean_traffic), (plain_round, plain_traffic) = results["lean"], results["stateless"]
    np.testing.assert_array_equal(lean_round.mean, plain_round.mean)
    assert lean_round.fitness == plain_round.fitness
    assert len(network.bodies("POST", "/v1/inputs")) == lean_traffic.registrations == 2
    # One handle call per generation (clean and perturbed are its two parts) and one for the final
    # mean, against two stateless calls each.
    assert len(network.bodies("POST", "/v1/score/handle")) == 4 + 1
    assert not network.bodies("POST", "/v1/score")
    assert lean_traffic.calls - lean_traffic.registrations == 4 + 1
    assert plain_traffic.calls == 2 * 4 + 2
    sent = sum(len(b) for m, p, b in network.requests if m == "POST")
    assert lean_traffic.bytes_sent == sent < plain_traffic.bytes_sent
    registered = [InputsRegistration.model_validate_json(b) for b in network.bodies("POST", "/v1/inputs")]
    assert all(r.ids.dtype == "uint16" for r in registered)  # the tiny BERT's vocabulary fits


def test_the_client_registers_again_after_the_service_evicted_its_inputs(
    small_url: str, task: ResolvedTask, split: EncodedSplit, relay: Callable[[str], Relay]
) -> None:
    """The service's cache holds one of two input sets: scoring A, then B (which evicts A), then A
    again makes the client's handle call for A answer 404; the client registers A again, repeats
    the call and gets A's first logits exactly.
    Break seen to fail: ``ModelService._score_call`` giving up on the first 404 (``if exc.status
    != 404 or attempt == 0``): the third score raises FatalServiceError."""
    network = relay(small_url)
    model = _service(network.url)
    a, b = split.input_ids[:6], split.input_ids[6:]
    z = np.random.default_rng(2).normal(size=(3, 16))
    first = model.score(task.spec, a, z=z, projection=PROJECTION)
    model.score(task.spec, b, z=z, projection=PROJECTION)
    again = model.score(task.spec, a, z=z, projection=PROJECTION)
    np.testing.assert_array_equal(again, first)
    assert model.traffic.registrations == 3  # A, B, A again
    handles = [InputsRegistration.model_validate_json(x).handle for x in network.bodies("POST", "/v1/inputs")]
    assert handles[0] == handles[2] != handles[1]
    assert len(network.bodies("POST", "/v1/score/handle")) == 4  # A, B, A (404), A


def test_the_client_falls_back_to_stateless_scoring(
    off_url: str, model_url: str, task: ResolvedTask, split: EncodedSplit, relay: Callable[[str], Relay]
) -> None:
    """A service that keeps no inputs (``input_handles`` false in /v1/model) gets stateless calls
    only, with the handle path's logits; one that says it does but answers the registration 404
    (an older build behind a newer front, say) is asked once and then scored stateless.
    Break seen to fail: a 404 on ``POST /v1/inputs`` treated as fatal (the ``(404, 405)`` branch of
    ``_handle_for`` removed): the second client raises FatalServiceError."""
    network = relay(off_url)
    model = _service(network.url)
    assert model.info().input_handles is False
    z = np.random.default_rng(3).normal(size=(4, 16))
    plain = model.score(task.spec, split.input_ids, z=z, projection=PROJECTION)
    lean = _service(model_url).score(task.spec, split.input_ids, z=z, projection=PROJECTION)
    np.testing.assert_array_equal(plain, lean)
    assert len(network.bodies("POST", "/v1/score")) == 1 and not network.bodies("POST", "/v1/inputs")

    claims = _service(network.url)
    claims._info = claims.info().model_copy(update={"input_handles": True})
    for _ in range(2):
        np.testing.assert_array_equal(
            claims.score(task.spec, split.input_ids, z=z, projection=PROJECTION), plain
        )
    assert len(network.bodies("POST", "/v1/inputs")) == 1  # asked once, then never again
    assert len(network.bodies("POST", "/v1/score")) == 3


def test_a_replica_that_dies_hands_the_site_over_to_the_next(
    tiny_bert: Path, model_url: str, task: ResolvedTask, split: EncodedSplit, tmp_path: Path
) -> None:
    """Two real service processes on the same model, listed as replicas: the site scores on the
    first; once it is killed, the next call moves to the second at once, registers its inputs
    there (the second never saw them: 404, then registration) and gets the same logits.
    Break seen to fail: ``JsonService.request`` that never calls ``_next_replica``: the call
    retries the dead replica until its budget is spent and raises ServiceUnavailable."""
    proc, first = _serve(tiny_bert, tmp_path / "replica.log")
    z = np.random.default_rng(5).normal(size=(3, 16))
    ids = [row + row[:1] for row in split.input_ids[:5]]  # inputs no other test registers anywhere
    with running(proc, ready_url=f"{first}/readyz", timeout=180):
        http = JsonService(
            "model service", first, timeout_s=120, retry=RetryPolicy(total_s=8, initial_s=0.1, max_backoff_s=1),
            alternates=(model_url,),
        )  # fmt: skip
        model = ModelService(http)
        before = model.score(task.spec, ids, z=z, projection=PROJECTION)
        assert http.current_url == first and model.traffic.registrations == 1
        proc.kill()
        after = model.score(task.spec, ids, z=z, projection=PROJECTION)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)  # another process: same weights
    assert http.current_url == model_url and model.traffic.registrations == 2
