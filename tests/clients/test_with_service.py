"""The client's scoring, local training and evaluation against the real inference service
(``fedbpt serve-model`` on a tiny random BERT, max_rows 64)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from fed_clients.data import load_labeled_texts
from fed_clients.evaluate import evaluate_prompt
from fed_clients.inputs import EncodedSplit, encode_split, input_budget
from fed_clients.losses import accuracy, cross_entropy, fitness
from fed_clients.model_api import ModelService
from fed_clients.perturb import Perturber
from fed_clients.presets import ResolvedTask, resolve_task
from fed_clients.training import make_score_fn, score_candidates, train_locally
from fed_clients.transport import JsonService, RetryPolicy
from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port
from protos import (
    Array,
    GlobalState,
    ProjectionSpec,
    PromptResponse,
    ScoreRequest,
    ScoreResponse,
    TaskSpec,
    TemplatePerturbation,
)
from tests.clients.conftest import SST2_SAMPLE, StandIn, write_jsonl

PROJECTION = ProjectionSpec(seed=7, intrinsic_dim=16, prompt_length=4)


@pytest.fixture(scope="module")
def model(model_url: str) -> Iterator[ModelService]:
    http = JsonService(
        "model service", model_url, timeout_s=120, retry=RetryPolicy(total_s=30, initial_s=0.1)
    )
    yield ModelService(http)
    http.close()


@pytest.fixture(scope="module")
def task(model: ModelService) -> ResolvedTask:
    return resolve_task("sst2", model.info().head)


@pytest.fixture(scope="module")
def split(model: ModelService, task: ResolvedTask, tmp_path_factory: pytest.TempPathFactory) -> EncodedSplit:
    path = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", SST2_SAMPLE)
    budget = input_budget(model, task, PROJECTION.prompt_length, 32)
    return encode_split(model, load_labeled_texts(path), task, budget)


def _state(d: int = 16, sigma: float = 1.0) -> GlobalState:
    return GlobalState(mean=Array.from_numpy(np.zeros(d)), sigma=sigma, cov=Array.from_numpy(np.ones(d)))


def test_splits_calls_to_respect_max_rows(
    model: ModelService, task: ResolvedTask, split: EncodedSplit
) -> None:
    assert model.info().max_rows == 64
    z = np.random.default_rng(0).normal(size=(5, 16))
    ids = split.input_ids * 3  # 36 inputs x 5 prompts = 180 rows: three calls of at most 12 inputs
    before = model.traffic.copy()
    logits = model.score(task.spec, ids, z=z, projection=PROJECTION)
    used = model.traffic.since(before)
    assert logits.shape == (5, 36, 2)
    assert used.calls - used.registrations == 3 and used.rows == 180  # score calls
    assert used.registrations <= 1  # the three slices hold the same 12 inputs: one handle
    assert used.bytes_sent > 0 and used.bytes_received > 180 * 2 * 4  # float32 logits, base64
    # The same inputs in one call (fits: 5 x 12 = 60 rows) give the same logits.
    one = model.score(task.spec, split.input_ids, z=z, projection=PROJECTION)
    assert np.allclose(logits[:, :12], one, atol=1e-5)
    assert np.allclose(logits[:, 24:], one, atol=1e-5)


def test_local_round_makes_one_call_per_generation_and_scoring(
    model: ModelService, task: ResolvedTask, split: EncodedSplit
) -> None:
    info = model.info()
    perturbed = Perturber(info.vocab_size, tuple(info.special_token_ids), 0.5).copy(
        split.input_ids, 1234, 0, "c1"
    )
    score = make_score_fn(model, task.spec, PROJECTION)
    before = model.traffic.copy()
    result = train_locally(score, _state(), split.input_ids, split.labels, 5, 3, 1234, perturbed=perturbed)
    used = model.traffic.since(before)
    # Clean + perturbed in one handle call per generation, then one for the final mean.
    assert used.calls - used.registrations == 3 + 1
    assert len(result.sigmas) == 3 and result.sigmas[0] == 1.0
    assert result.mu == 2
    assert np.abs(result.mean).max() > 0  # the mean moved
    # The uploaded fitness is mean CE(clean) / mean CE(perturbed) of the final mean, labels local.
    clean = cross_entropy(score(result.mean[None], [(split.input_ids, None)])[0], split.labels)
    pert = cross_entropy(score(result.mean[None], [(perturbed.input_ids, None)])[0], split.labels)
    assert result.fitness == pytest.approx(float(fitness(clean, pert)[0]), rel=1e-9)
    assert result.train_loss == pytest.approx(float(clean[0]), rel=1e-9)
    # The reported train accuracy is the final mean's on the clean inputs (mutants 85 of
    # `make mutation GROUP=training`), and the history holds each generation's best fitness (57, 86).
    clean_logits = score(result.mean[None], [(split.input_ids, None)])[0]
    assert result.train_accuracy == pytest.approx(float(accuracy(clean_logits, split.labels)[0]))
    assert len(result.fitness_history) == 3
    assert all(isinstance(v, float) and np.isfinite(v) for v in result.fitness_history)
    # Same seed, same state: the same round again (the service is deterministic).
    again = train_locally(score, _state(), split.input_ids, split.labels, 5, 3, 1234, perturbed=perturbed)
    assert np.array_equal(again.mean, result.mean)


def test_without_perturbation_one_call_per_generation(
    model: ModelService, task: ResolvedTask, split: EncodedSplit
) -> None:
    before = model.traffic.copy()
    result = train_locally(
        make_score_fn(model, task.spec, PROJECTION), _state(), split.input_ids, split.labels, 4, 2, 5
    )
    used = model.traffic.since(before)
    assert used.calls - used.registrations == 2 + 1
    assert result.fitness == pytest.approx(result.train_loss)


def test_shared_es_scores_each_candidate_in_one_call_as_it_would_score_alone(
    model: ModelService, task: ResolvedTask, split: EncodedSplit
) -> None:
    candidates = np.random.default_rng(4).normal(size=(5, 16))
    before = model.traffic.copy()
    scores = score_candidates(
        make_score_fn(model, task.spec, PROJECTION), candidates, split.input_ids, split.labels
    )
    used = model.traffic.since(before)
    assert used.calls - used.registrations == 1  # no search: the five candidates travel once
    alone = [evaluate_prompt(model, task.spec, split, z=z, projection=PROJECTION) for z in candidates]
    np.testing.assert_allclose(scores.losses, [a.loss for a in alone], rtol=1e-5)
    best = int(np.argmin(scores.losses))
    assert scores.train_loss == scores.losses[best] and scores.train_accuracy == alone[best].accuracy


def test_scope_all_reaches_the_service(model: ModelService, task: ResolvedTask, split: EncodedSplit) -> None:
    info = model.info()
    z = np.random.default_rng(1).normal(size=(1, 16))
    base = Perturber(info.vocab_size, tuple(info.special_token_ids), 0.0, scope="all")
    copy = base.copy(split.input_ids, 1, 0, "c")  # rate 0 for the inputs ...
    assert copy.template is not None and copy.input_ids == split.input_ids
    hard = Perturber(info.vocab_size, tuple(info.special_token_ids), 1.0, scope="all").copy(
        split.input_ids, 1, 0, "c"
    )
    assert hard.template is not None
    clean = model.score(task.spec, split.input_ids, z=z, projection=PROJECTION)
    # ... and rate 1 on the service's side: template, specials and mask replaced, logits change.
    templated = model.score(
        task.spec, split.input_ids, z=z, projection=PROJECTION, perturb_template=hard.template
    )
    assert not np.allclose(clean, templated)


def test_split_calls_give_each_input_its_own_template_draw(
    model: ModelService, task: ResolvedTask, split: EncodedSplit
) -> None:
    """The service perturbs row b of a call from (seed, b); a score split over several calls offsets
    the seed by the call's first input. Catches a split that sends every call the same seed: input
    12 (row 0 of the second call) would then get input 0's perturbed copy. The same 12 inputs three
    times: equal clean logits in every call, three different perturbed copies."""
    z = np.random.default_rng(4).normal(size=(5, 16))
    ids = split.input_ids * 3  # 36 inputs x 5 prompts, max_rows 64: three calls of 12 inputs
    template = TemplatePerturbation(rate=0.5, seed=99)
    before = model.traffic.copy()
    clean = model.score(task.spec, ids, z=z, projection=PROJECTION)
    perturbed = model.score(task.spec, ids, z=z, projection=PROJECTION, perturb_template=template)
    used = model.traffic.since(before)
    assert used.calls - used.registrations == 6
    for k in (12, 24):
        np.testing.assert_allclose(clean[:, k : k + 12], clean[:, :12], atol=1e-5, rtol=0)
        # Per input, the largest change over prompts and labels (measured >= 4e-4; float noise ~1e-7).
        moved = np.abs(perturbed[:, k : k + 12] - perturbed[:, :12]).max(axis=(0, 2))
        assert (moved > 1e-5).all(), moved
    # The same split again: the same copies (the seeds are the request's, not drawn per call).
    again = model.score(task.spec, ids, z=z, projection=PROJECTION, perturb_template=template)
    np.testing.assert_allclose(again, perturbed, atol=1e-5, rtol=0)


def test_evaluation_matches_a_direct_score_and_reports_progress(
    model: ModelService, task: ResolvedTask, split: EncodedSplit
) -> None:
    z = np.random.default_rng(2).normal(size=16)
    seen: list[int] = []
    chunked = evaluate_prompt(
        model, task.spec, split, z=z, projection=PROJECTION, batch_size=5, progress=seen.append
    )
    whole = evaluate_prompt(model, task.spec, split, z=z, projection=PROJECTION)
    logits = model.score(task.spec, split.input_ids, z=z[None], projection=PROJECTION)
    expected = float((logits[0].argmax(1) == split.labels).mean())
    assert chunked.accuracy == whole.accuracy == expected
    assert seen == [5, 10, 12]
    assert chunked.confusion.sum() == 12 and chunked.correct == round(expected * 12)
    zero = evaluate_prompt(model, task.spec, split)  # no prompt rows at all
    assert zero.n == 12 and 0 <= zero.accuracy <= 1
    assert zero.loss != pytest.approx(whole.loss)


def test_input_budget_keeps_rows_within_max_length(
    model: ModelService, task: ResolvedTask, tmp_path: Path
) -> None:
    long_text = " ".join(["great film"] * 600)
    path = write_jsonl(tmp_path / "long.jsonl", [(long_text, 1), ("bad", 0)])
    budget = input_budget(model, task, 50, 10_000)  # max_input_tokens far above the model's room
    assert budget < model.info().max_length - 50
    encoded = encode_split(model, load_labeled_texts(path), task, budget)
    assert encoded.truncated == 1 and len(encoded.input_ids[0]) == budget
    # The service accepts the longest row this gives (it refuses rows over max_length with a 400).
    z = np.zeros((1, 16))
    logits = model.score(
        task.spec, encoded.input_ids, z=z, projection=PROJECTION.model_copy(update={"prompt_length": 50})
    )
    assert logits.shape == (1, 2, 2)


def _evaluate_cli(model_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fedbpt_command("evaluate", "--model-endpoint", model_url, *args),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_evaluate_command_zero_shot_and_with_a_prompt_file(
    model_url: str, tmp_path: Path, shared_data: Path
) -> None:
    data = shared_data / "sst2" / "test.jsonl"
    zero = _evaluate_cli(model_url, "--data", str(data), "--limit", "60", "--batch-size", "32")
    assert zero.returncode == 0, zero.stderr
    assert "zero-shot" in zero.stdout and "negative" in zero.stdout
    assert re.search(r"accuracy: 0\.\d{4} \(\d+/60\)", zero.stdout)

    prompt = PromptResponse(
        z=Array.from_numpy(np.random.default_rng(3).normal(size=16).astype(np.float32)),
        projection=PROJECTION,
        round=7,
        task="sst2",
    )
    prompt_file = tmp_path / "prompt.json"
    prompt_file.write_text(prompt.model_dump_json())
    tuned = _evaluate_cli(model_url, "--data", str(data), "--limit", "60", "--run-prompt", str(prompt_file))
    assert tuned.returncode == 0, tuned.stderr
    assert "prompt of round 7" in tuned.stdout
    assert re.search(r"accuracy: 0\.\d{4} \(\d+/60\)", tuned.stdout)


def test_evaluate_command_errors(model_url: str, tmp_path: Path, sst2_file: Path) -> None:
    bad = tmp_path / "prompt.json"
    bad.write_text(json.dumps({"z": [1, 2]}))
    done = _evaluate_cli(model_url, "--data", str(sst2_file), "--run-prompt", str(bad))
    assert done.returncode == 2 and "not a PromptResponse" in done.stderr
    done = _evaluate_cli(model_url, "--data", str(sst2_file), "--task", "nope")
    assert done.returncode == 2 and "unknown task preset 'nope'" in done.stderr


def test_scoring_rides_out_a_real_service_restart(
    tiny_bert: Path, task: ResolvedTask, split: EncodedSplit, tmp_path: Path
) -> None:
    """The real ``fedbpt serve-model`` is stopped and, a few seconds later, started again on the
    same port: calls made while it is down are retried (connection refused) and then answered."""
    port = free_port()

    def service() -> ManagedProcess:
        argv = fedbpt_command(
            "serve-model", "--model", str(tiny_bert), "--port", str(port), "--device", "cpu",
            "--threads", "1", "--log-level", "warning",
        )  # fmt: skip
        return ManagedProcess("serve-model", argv, tmp_path / "serve.log")

    url = f"http://127.0.0.1:{port}"
    first = service().start()
    first.wait_http(f"{url}/readyz", timeout=180)
    http = JsonService(
        "model service", url, timeout_s=120, retry=RetryPolicy(total_s=180, initial_s=0.2, max_backoff_s=1.0)
    )
    model = ModelService(http)
    z = np.random.default_rng(0).normal(size=(2, PROJECTION.intrinsic_dim))
    before = model.score(task.spec, split.input_ids, z=z, projection=PROJECTION)
    first.stop()
    second = service()
    later = threading.Timer(3.0, second.start)
    later.start()
    try:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)  # really down
        after = model.score(task.spec, split.input_ids, z=z, projection=PROJECTION)
    finally:
        later.join()
        second.stop()
        http.close()
    np.testing.assert_allclose(after, before, atol=1e-5)


def test_compact_answers_carry_the_same_ids_and_logits_in_fewer_bytes(
    model_url: str, task: ResolvedTask, split: EncodedSplit
) -> None:
    """A site that asks for compact answers (the default) gets the token ids and the logits the
    JSON answers carry, bit for bit, and receives fewer bytes: for the logits at least base64's
    third of their raw bytes less. Breaks seen to fail: ``ModelService._post_score`` not sending
    the Accept header (the same bytes received both ways); ``_tokenize_call`` reading a packed
    answer as JSON lists (a FatalServiceError)."""
    z = np.random.default_rng(3).normal(size=(5, 16))
    texts = [text for text, _ in SST2_SAMPLE] * 10
    got: dict[bool, tuple[np.ndarray, int]] = {}
    tokens: dict[bool, tuple[list[list[int]], int]] = {}
    for frames in (True, False):
        http = JsonService(
            "model service", model_url, timeout_s=120, retry=RetryPolicy(total_s=30, initial_s=0.1)
        )
        site = ModelService(http, compact_answers=frames)
        before = site.traffic.copy()
        tokens[frames] = (site.tokenize(texts), site.traffic.since(before).bytes_received)
        site.score(task.spec, split.input_ids, z=z, projection=PROJECTION)  # registers the inputs
        before = site.traffic.copy()
        logits = site.score(task.spec, split.input_ids, z=z, projection=PROJECTION)
        got[frames] = (logits, site.traffic.since(before).bytes_received)
        http.close()
    assert got[True][0].tobytes() == got[False][0].tobytes()
    assert tokens[True][0] == tokens[False][0]
    assert tokens[True][1] < tokens[False][1]
    raw = 5 * len(split.input_ids) * len(task.spec.labels) * 4
    assert got[False][1] - got[True][1] >= 4 * -(-raw // 3) - raw


def test_a_service_that_answers_json_is_read_as_json(stand_in: Callable[..., StandIn]) -> None:
    """A service older than score frames ignores the Accept header and answers JSON: the site
    reads it by its Content-Type. Break seen to fail: decoding every answer as a frame."""
    logits = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    answer = ScoreResponse(logits=Array.from_numpy(logits), rows=6)
    server = stand_in().start()
    server.script.on("/v1/score", (200, json.loads(answer.model_dump_json())))
    with JsonService("model service", server.url, retry=RetryPolicy(total_s=5, initial_s=0.1)) as http:
        site = ModelService(http, compact_answers=True, input_handles=False)
        request = ScoreRequest(
            task=TaskSpec(template="{input}", labels=["a", "b"]), input_ids=[[5], [6], [7]]
        )
        got = site._post_score("/v1/score", request)
    assert got.logits.numpy().tobytes() == logits.tobytes()
