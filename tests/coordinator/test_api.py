"""The coordinator's HTTP API on a real SQLite file (FastAPI's TestClient): the round lifecycle,
tasks, updates, evaluations, records and bytes, validation, and the run-level rules."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from coordinator.aggregators import Contribution, aggregate
from coordinator.es_state import initial_es
from protos import Array, ClientMetrics, PromptResponse, RoundRecord, RunConfig, RunInfo, Task
from tests.coordinator.conftest import ADMIN_HEADERS, Coordinator, small_config, synthetic_update


def test_empty_body_creates_a_run_with_every_default(coord: Coordinator) -> None:
    body: dict[str, Any] | None
    for body in ({}, None):  # {} and no body at all
        r = coord.http.post("/v1/runs", headers=ADMIN_HEADERS, json=body)
        assert r.status_code == 201, r.text
        info = RunInfo.model_validate(
            coord.http.get(f"/v1/runs/{r.json()['run_id']}", headers=ADMIN_HEADERS).json()
        )
        assert info.config == RunConfig()
        assert (info.state, info.round, info.clients, info.rounds_completed) == ("created", 0, 0, 0)


def test_invalid_run_config_is_422(coord: Coordinator) -> None:
    r = coord.http.post("/v1/runs", json={"rounds": 0}, headers=ADMIN_HEADERS)
    assert r.status_code == 422
    r = coord.http.post("/v1/runs", json={"no_such_field": 1}, headers=ADMIN_HEADERS)
    assert r.status_code == 422


def test_a_whole_run_with_records_bytes_and_final_evaluation(coord: Coordinator) -> None:
    run_id, sites = coord.new_run(3, rounds=2)
    sent: dict[tuple[int, str], int] = {}
    received: dict[tuple[int, str], int] = {}
    updates: dict[int, list[Contribution]] = {0: [], 1: []}
    for round_ in range(2):
        for k, site in enumerate(sites):
            r = coord.http.get(f"/v1/runs/{run_id}/task", headers=site.headers)
            task = Task.model_validate_json(r.content)
            assert task.kind == "train" and task.round == round_
            assert task.config is not None and task.config.rounds == 2 and task.state is not None
            assert task.client_seed == task.config.seed == 1234  # shared seeds (the reference)
            assert task.evaluate is True and task.deadline is not None
            assert task.state.cov is not None and task.state.cov.shape == [16, 16]
            assert task.state.cov.dtype == "float32" and task.state.mean.dtype == "float64"
            metrics = ClientMetrics(train_loss=0.5 + k / 10, test_accuracy=0.5 + k / 10, n_test=10 * (k + 1))
            update = synthetic_update(task, 100 * round_ + k, metrics=metrics)
            body = update.model_dump_json()
            ack = coord.post_update(run_id, round_, site, body)
            assert ack.status_code == 200, ack.text
            assert ack.json() == {
                "accepted": True,
                "duplicate": False,
                "round": round_,
                "round_closed": k == len(sites) - 1,
            }
            sent[(round_, site.client_id)] = len(body.encode())
            received[(round_, site.client_id)] = len(r.content) + len(ack.content)
            updates[round_].append(
                Contribution(
                    site.client_id,
                    update.mean.numpy().astype(np.float64),
                    update.fitness,
                    tuple(update.sigmas),
                    update.mu,
                    update.n_samples,
                )
            )
        # A client that already answered waits for the round to close.
    info = RunInfo.model_validate(coord.info(run_id))
    assert (info.state, info.round, info.rounds_completed) == ("finished", 2, 2)

    # The stored state is exactly our aggregation of what was sent, round after round.
    config = RunConfig.model_validate(info.config)
    state = initial_es(16, 1.0, 2, config.rounds)
    for round_ in range(2):
        state = aggregate(config, state, updates[round_]).state
    prompt = PromptResponse.model_validate(
        coord.http.get(f"/v1/runs/{run_id}/prompt", headers=sites[0].headers).json()
    )
    assert prompt.round == 2 and prompt.task == "sst2" and prompt.projection == config.projection
    assert np.array_equal(prompt.z.numpy(), state.mean)

    # done: the final state, to evaluate and report as the last round (round 1).
    done = coord.task(run_id, sites[0])
    assert done.kind == "done" and done.round == 2 and done.state is not None
    assert np.array_equal(done.state.mean.numpy(), state.mean) and done.state.sigma == state.sigma
    for k, site in enumerate(sites[:2]):
        r = coord.http.post(
            f"/v1/runs/{run_id}/rounds/1/eval",
            json={"test_accuracy": 0.8 + k / 10, "n_test": 10 * (k + 1)},
            headers=site.headers,
        )
        assert r.status_code == 200 and r.json()["duplicate"] is False, r.text
    again = coord.http.post(
        f"/v1/runs/{run_id}/rounds/1/eval", json={"test_accuracy": 0.1, "n_test": 5}, headers=sites[0].headers
    )
    assert again.status_code == 200 and again.json()["duplicate"] is True

    records = [RoundRecord.model_validate(x) for x in coord.rounds(run_id)]
    assert [(r.round, r.state, r.attempt) for r in records] == [(0, "closed", 1), (1, "closed", 1)]
    for rec in records:
        assert rec.sampled == [s.client_id for s in sites]
        assert [p.client_id for p in rec.participants] == [s.client_id for s in sites]
        for p in rec.participants:
            assert p.bytes_in == sent[(rec.round, p.client_id)]
            assert p.bytes_out == received[(rec.round, p.client_id)]
            assert not p.clipped and not p.rejected
        assert rec.bytes_in == sum(p.bytes_in for p in rec.participants)
        assert rec.bytes_out == sum(p.bytes_out for p in rec.participants)
        assert rec.train_loss == pytest.approx((0.5 + 0.6 + 0.7) / 3)
        # n_test-weighted: (0.5*10 + 0.6*20 + 0.7*30) / 60
        assert rec.test_accuracy == pytest.approx((5 + 12 + 21) / 60)
        assert rec.aggregation_seconds is not None and rec.closed_at is not None
        assert rec.server_sigma is not None and rec.mean_norm is not None
    assert records[0].sigma_before == 1.0 and records[0].sigma_after == records[1].sigma_before
    assert records[1].sigma_after == state.sigma
    assert records[1].mean_norm == pytest.approx(float(np.linalg.norm(state.mean)))
    assert records[0].final_test_accuracy is None
    assert records[1].final_test_accuracy == pytest.approx((0.8 * 10 + 0.9 * 20) / 30)
    info = RunInfo.model_validate(coord.info(run_id))
    assert info.final_accuracy == pytest.approx((0.8 * 10 + 0.9 * 20) / 30)
    assert info.best_accuracy == pytest.approx(info.final_accuracy)


def test_options_reach_the_task(coord: Coordinator) -> None:
    run_id, sites = coord.new_run(2, covariance="diagonal", client_seeds="per_client", eval_every=2)
    tasks = [coord.task(run_id, s) for s in sites]
    for t in tasks:
        assert t.state is not None and t.state.cov is not None
        assert t.state.cov.shape == [16] and t.evaluate is True
    assert tasks[0].client_seed != tasks[1].client_seed
    assert all(t.client_seed is not None and 1 <= t.client_seed < 2**31 for t in tasks)
    for k, s in enumerate(sites):
        coord.post_update(run_id, 0, s, synthetic_update(tasks[k], k))
    nxt = [coord.task(run_id, s) for s in sites]
    assert all(t.round == 1 and t.evaluate is False for t in nxt)  # eval_every = 2
    assert nxt[0].client_seed not in (tasks[0].client_seed, nxt[1].client_seed)
    # The diagonal is the diagonal of the server's full C (which the server keeps).
    state = coord.http.app.state.engine.runs.state(run_id)[1]
    assert nxt[0].state is not None and nxt[0].state.cov is not None
    np.testing.assert_array_equal(nxt[0].state.cov.numpy(), np.diag(state.es.C).astype(np.float32))

    run64, sites64 = coord.new_run(1, covariance_dtype="float64")
    t64 = coord.task(run64, sites64[0])
    assert t64.state is not None and t64.state.cov is not None and t64.state.cov.dtype == "float64"

    low, low_sites = coord.new_run(1, covariance="lowrank", covariance_rank=3)
    tl = coord.task(low, low_sites[0])
    assert tl.state is not None and tl.state.cov is None and tl.state.cov_lowrank is not None
    assert tl.state.cov_lowrank.vectors.shape == [3, 16]
    body = small_config(covariance="lowrank", covariance_rank=16)
    refused = coord.http.post("/v1/runs", json=body, headers=ADMIN_HEADERS)
    assert refused.status_code == 422 and "must be below intrinsic_dim" in refused.text

    fed, fed_sites = coord.new_run(1, aggregator="fedavg", fedavg_sigma=0.3)
    tf = coord.task(fed, fed_sites[0])
    assert tf.state is not None and tf.state.cov is None and tf.state.sigma == 0.3


def test_duplicates_and_late_updates(coordinator_factory: Callable[..., Coordinator]) -> None:
    coord = coordinator_factory()
    run_id, (a, b, c) = coord.new_run(3, min_clients=2, round_timeout_s=0.5)
    ta, tb, tc = (coord.task(run_id, s) for s in (a, b, c))
    first = synthetic_update(ta, 1)
    assert coord.post_update(run_id, 0, a, first).json()["duplicate"] is False
    before = coord.dump()
    # The same client again, even with other content: acknowledged, nothing changes.
    other = synthetic_update(ta, 99, fitness=0.01)
    r = coord.post_update(run_id, 0, a, other)
    assert r.status_code == 200 and r.json() == {
        "accepted": True,
        "duplicate": True,
        "round": 0,
        "round_closed": False,
    }
    assert coord.dump() == before
    assert coord.task(run_id, a).kind == "wait"  # answered: wait for the round to close
    coord.post_update(run_id, 0, b, synthetic_update(tb, 2))
    # Deadline: the round closes with a and b (min_clients = 2); c is late.
    nxt = coord.task(run_id, a, wait=5)
    assert nxt.kind == "train" and nxt.round == 1
    late = coord.post_update(run_id, 0, c, synthetic_update(tc, 3))
    assert late.status_code == 409 and "closed" in late.json()["detail"]
    repeat = coord.post_update(run_id, 0, a, first)
    assert (
        repeat.status_code == 200
        and repeat.json()["duplicate"] is True
        and repeat.json()["round_closed"] is True
    )
    rec = RoundRecord.model_validate(coord.rounds(run_id)[0])
    assert [p.client_id for p in rec.participants] == [a.client_id, b.client_id]
    assert rec.participants[0].fitness == first.fitness  # the first update counts, not the repeat


def test_a_rerun_with_the_same_names_draws_the_same_whatever_the_enrolment_order(
    coord: Coordinator,
) -> None:
    """Client ids are random and sites enrol in any order; sampling, per-client seeds and the
    aggregated state follow the names, so two runs with the same seed and names are identical."""
    names = ["org-a", "org-b", "org-c", "org-d", "org-e", "org-f"]
    outcomes = []
    for order in (names, names[::-1]):
        run_id = coord.create_run(frac=0.5, client_seeds="per_client", min_clients=1)
        by_name = {s.name: s for s in coord.enrol(run_id, len(order), names=order)}
        coord.start(run_id)
        sampled = set(coord.rounds(run_id)[0]["sampled"])
        chosen = sorted(n for n, s in by_name.items() if s.client_id in sampled)
        tasks = {n: coord.task(run_id, by_name[n]) for n in chosen}
        # Updates arrive in enrolment order; each name answers the same update in both runs.
        for name in [n for n in order if n in tasks]:
            update = synthetic_update(tasks[name], names.index(name))
            assert coord.post_update(run_id, 0, by_name[name], update).status_code == 200
        state = coord.http.app.state.engine.runs.state(run_id)
        assert state[0] == 1
        seeds = {n: t.client_seed for n, t in tasks.items()}
        outcomes.append((chosen, seeds, state[1].mean.tobytes(), state[1].sigma))
    assert len(outcomes[0][0]) == 3
    assert outcomes[0] == outcomes[1]


def test_not_sampled_future_and_unknown_rounds(coord: Coordinator) -> None:
    run_id, sites = coord.new_run(4, frac=0.5)
    record = coord.rounds(run_id)[0]
    assert len(record["sampled"]) == 2  # max(int(0.5 * 4), 1)
    outsider = next(s for s in sites if s.client_id not in record["sampled"])
    insider = next(s for s in sites if s.client_id in record["sampled"])
    assert coord.task(run_id, outsider).kind == "wait"
    task = coord.task(run_id, insider)
    r = coord.post_update(run_id, 0, outsider, synthetic_update(task, 1))
    assert r.status_code == 409 and "not sampled" in r.json()["detail"]
    for round_ in (1, 7, -1):
        r = coord.post_update(run_id, round_, insider, synthetic_update(task, 1))
        assert r.status_code == 404, (round_, r.text)
    created = coord.create_run()
    (member,) = coord.enrol(created, 1)
    r = coord.post_update(created, 0, member, synthetic_update(task, 1))
    assert r.status_code == 404  # not started: no round 0 yet
    assert coord.task(created, member).kind == "wait"
    assert coord.http.get("/v1/runs/run-nope", headers=ADMIN_HEADERS).status_code == 404


def _nan_mean(d: int) -> str:
    raw = np.full(d, np.nan).astype("<f8").tobytes()
    return json.dumps({"dtype": "float64", "shape": [d], "data": base64.b64encode(raw).decode()})


def test_bad_updates_are_refused_and_change_nothing(coord: Coordinator) -> None:
    run_id, (a, b) = coord.new_run(2)
    task = coord.task(run_id, a)
    coord.post_update(run_id, 0, b, synthetic_update(coord.task(run_id, b), 5))
    good = json.loads(synthetic_update(task, 1).model_dump_json())

    def variant(**changes: Any) -> str:
        return json.dumps({**good, **changes})

    wrong_dim = Array.from_numpy(np.zeros(15)).model_dump()
    int_mean = Array.from_numpy(np.zeros(16, dtype=np.int64)).model_dump()
    cases: list[tuple[str, int]] = [
        (variant(mean=wrong_dim), 400),
        (variant(mean=int_mean), 400),
        (variant(sigmas=[1.0, 1.0]), 400),
        (variant(sigmas=[1.0, -1.0, 1.0]), 422),
        (variant(sigmas=[1.0, 0.0, 1.0]), 422),
        (variant(mu=0), 422),
        (variant(mu=6), 400),
        (variant(n_samples=0), 422),
        (variant(fitness="x"), 422),
        (variant(metrics={"test_accuracy": 1.5}), 400),
        (variant(metrics={"n_test": -1}), 400),
        (variant(extra_field=1), 422),
        (variant(fitness=float("inf")), 422),  # json.dumps writes the non-standard Infinity token
        (variant(fitness=float("nan")), 422),
        (
            '{"mean": ' + _nan_mean(16) + ', "fitness": 0.5, "sigmas": [1, 1, 1], "mu": 2, "n_samples": 3}',
            422,
        ),
        ("{not json", 422),
    ]
    assert "Infinity" in cases[-4][0] and "NaN" in cases[-3][0]
    before = coord.dump()
    for body, status in cases:
        r = coord.post_update(run_id, 0, a, body)
        assert r.status_code == status, (body[:120], r.text)
        assert isinstance(r.json()["detail"], str | list) and r.json()["detail"]
    assert coord.post_update(run_id, 3, a, json.dumps(good)).status_code == 404
    assert coord.dump() == before  # byte-identical: nothing stored, nothing counted
    assert coord.post_update(run_id, 0, a, json.dumps(good)).status_code == 200


def test_deadline_closes_a_round_with_a_missing_client(coord: Coordinator) -> None:
    run_id, (a, b, c) = coord.new_run(3, min_clients=2, round_timeout_s=0.4, rounds=2)
    coord.train(run_id, a, 1)
    coord.train(run_id, b, 2)
    assert coord.task(run_id, c).round == 0  # c is asked, but never answers round 0
    assert coord.task(run_id, a, wait=10).round == 1  # the deadline closed round 0 with a and b
    nxt = coord.task(run_id, c)
    assert nxt.kind == "train" and nxt.round == 1  # round 1 samples c again
    rec = RoundRecord.model_validate(coord.rounds(run_id)[0])
    assert rec.state == "closed" and rec.attempt == 1
    assert rec.sampled == [a.client_id, b.client_id, c.client_id]
    assert [p.client_id for p in rec.participants] == [a.client_id, b.client_id]
    assert rec.sigma_after is not None and rec.server_sigma is not None


def test_reissue_then_fail_when_too_few_answer(coord: Coordinator) -> None:
    run_id, (a, b, c) = coord.new_run(3, min_clients=2, round_timeout_s=0.3, max_round_attempts=2)
    coord.train(run_id, a, 1)
    # First deadline: 1 < min_clients answers -> re-issued, a's answer kept.
    for _ in range(200):
        rec = coord.rounds(run_id)[0]
        if rec["attempt"] == 2:
            break
        time.sleep(0.05)
    assert rec["state"] == "open" and rec["attempt"] == 2 and len(rec["participants"]) == 1
    assert coord.task(run_id, a).kind == "wait"
    assert coord.task(run_id, b).kind == "train"
    # Second deadline, still one answer: the run fails with a clear error.
    for _ in range(200):
        info = coord.info(run_id)
        if info["state"] == "failed":
            break
        time.sleep(0.05)
    assert info["state"] == "failed"
    assert "round 0" in info["error"] and "min_clients" in info["error"] and "2 attempt" in info["error"]
    r = coord.http.get(f"/v1/runs/{run_id}/task", headers=c.headers)
    assert r.status_code == 409 and "failed" in r.json()["detail"]


@pytest.mark.parametrize("seed", range(6))
def test_reissue_keeps_answers_and_tops_up_the_sample(coord: Coordinator, seed: int) -> None:
    """Over several seeds, so that a re-issue which forgets who answered cannot pass by the luck
    of one draw (each seed keeps the answering site by chance with probability 1/2).
    Breaks caught: the re-issue drawing its sample without keeping the answers."""
    run_id, sites = coord.new_run(4, frac=0.5, min_clients=2, round_timeout_s=0.3, seed=seed)
    first = coord.rounds(run_id)[0]["sampled"]
    answering = next(s for s in sites if s.client_id == first[0])
    coord.train(run_id, answering, 1)
    for _ in range(200):
        rec = coord.rounds(run_id)[0]
        if rec["attempt"] >= 2:
            break
        time.sleep(0.05)
    assert answering.client_id in rec["sampled"] and len(rec["sampled"]) == 2
    other = next(s for s in sites if s.client_id in rec["sampled"] and s is not answering)
    ack = coord.train(run_id, other, 2)
    assert ack.json()["round_closed"] is True  # all of the re-issued sample answered
    closed = RoundRecord.model_validate(coord.rounds(run_id)[0])
    assert closed.state == "closed" and closed.attempt == 2
    assert [p.client_id for p in closed.participants] == sorted(
        [answering.client_id, other.client_id], key=[s.client_id for s in sites].index
    )


def test_long_poll_wakes_when_the_round_closes(coordinator_factory: Callable[..., Coordinator]) -> None:
    coord = coordinator_factory(max_task_wait_s=30)
    run_id, (a, b) = coord.new_run(2)
    coord.train(run_id, a, 1)
    result: dict[str, Task] = {}

    def poll() -> None:
        result["task"] = coord.task(run_id, a, wait=30)

    poller = threading.Thread(target=poll)
    poller.start()
    coord.train(run_id, b, 2)
    poller.join(timeout=25)
    assert not poller.is_alive(), "the long-poll did not wake when the round closed"
    assert result["task"].kind == "train" and result["task"].round == 1


def test_long_poll_is_cut_to_the_server_maximum(coordinator_factory: Callable[..., Coordinator]) -> None:
    coord = coordinator_factory(max_task_wait_s=0.1)
    run_id, (a, _b) = coord.new_run(2)
    coord.train(run_id, a, 1)
    assert coord.task(run_id, a, wait=3600).kind == "wait"
    r = coord.http.get(f"/v1/runs/{run_id}/task", params={"wait": -1}, headers=a.headers)
    assert r.status_code == 422


def test_robust_reject_is_recorded(coord: Coordinator) -> None:
    run_id, (a, b, c) = coord.new_run(3, robust="reject")
    for k, site in enumerate((a, b)):
        coord.train(run_id, site, k)
    task = coord.task(run_id, c)
    evil = synthetic_update(task, 3, fitness=0.0)
    evil = evil.model_copy(update={"mean": Array.from_numpy(np.full(16, 1e3))})
    assert coord.post_update(run_id, 0, c, evil).json()["round_closed"] is True
    rec = RoundRecord.model_validate(coord.rounds(run_id)[0])
    assert [(p.client_id, p.rejected, p.clipped) for p in rec.participants] == [
        (a.client_id, False, False),
        (b.client_id, False, False),
        (c.client_id, True, False),
    ]
    prompt = PromptResponse.model_validate(
        coord.http.get(f"/v1/runs/{run_id}/prompt", headers=a.headers).json()
    )
    assert float(np.abs(prompt.z.numpy()).max()) < 10


def test_run_level_conflicts(coord: Coordinator) -> None:
    empty = coord.create_run()
    r = coord.http.post(f"/v1/runs/{empty}/start", headers=ADMIN_HEADERS)
    assert r.status_code == 409 and "no enrolled clients" in r.json()["detail"]
    run_id, (a,) = coord.new_run(1, rounds=1)
    r = coord.http.post(f"/v1/runs/{run_id}/start", headers=ADMIN_HEADERS)
    assert r.status_code == 409 and "already started" in r.json()["detail"]
    r = coord.http.post(f"/v1/runs/{run_id}/clients", json={"name": a.name}, headers=ADMIN_HEADERS)
    assert r.status_code == 409 and "already enrolled" in r.json()["detail"]
    r = coord.http.post(
        f"/v1/runs/{run_id}/rounds/0/eval", json={"test_accuracy": 0.5, "n_test": 3}, headers=a.headers
    )
    assert r.status_code == 409 and "final state" in r.json()["detail"]  # not finished yet
    coord.train(run_id, a, 1)
    assert coord.info(run_id)["state"] == "finished"
    r = coord.http.post(f"/v1/runs/{run_id}/clients", json={"name": "late"}, headers=ADMIN_HEADERS)
    assert r.status_code == 409
    r = coord.http.post(
        f"/v1/runs/{run_id}/rounds/3/eval", json={"test_accuracy": 0.5, "n_test": 3}, headers=a.headers
    )
    assert r.status_code == 404
    r = coord.http.post(
        f"/v1/runs/{run_id}/rounds/0/eval", json={"test_accuracy": 2, "n_test": 3}, headers=a.headers
    )
    assert r.status_code == 422


def test_whoami_and_client_listing(coord: Coordinator) -> None:
    run_a, (a,) = coord.new_run(1)
    run_b, _ = coord.new_run(1)
    me = coord.http.get("/v1/whoami", headers=a.headers).json()
    assert me == {"client_id": a.client_id, "run_id": run_a, "name": a.name}
    assert [r["run_id"] for r in coord.http.get("/v1/runs", headers=a.headers).json()] == [run_a]
    assert [r["run_id"] for r in coord.http.get("/v1/runs", headers=ADMIN_HEADERS).json()] == [run_a, run_b]


def test_a_form_body_is_415_that_says_to_send_json(coord: Coordinator) -> None:
    """``curl -d`` sends a form content type; the answer says what to send instead, and nothing is
    stored. Break seen to fail: without the guard's content-type check the answer is a 422."""
    before = coord.dump()
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {}):
        r = coord.http.post("/v1/runs", content=b'{"rounds": 2}', headers={**ADMIN_HEADERS, **headers})
        assert r.status_code == 415 and "Content-Type: application/json" in r.json()["detail"], r.text
    assert coord.dump() == before
    # JSON with a charset, and a JSON media type with a suffix, are JSON.
    for media in ("application/json; charset=utf-8", "application/merge-patch+json"):
        r = coord.http.post(
            "/v1/runs", content=b'{"rounds": 2}', headers={**ADMIN_HEADERS, "Content-Type": media}
        )
        assert r.status_code == 201, r.text


def test_oversized_body_is_413(coordinator_factory: Callable[..., Coordinator]) -> None:
    coord = coordinator_factory(max_body_bytes=2048)
    run_id, (a,) = coord.new_run(1, projection={"intrinsic_dim": 500})
    task = coord.task(run_id, a)
    before = coord.dump()
    r = coord.post_update(run_id, 0, a, synthetic_update(task, 1))
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert coord.dump() == before


def test_an_oversized_streamed_body_is_413(coordinator_factory: Callable[..., Coordinator]) -> None:
    coord = coordinator_factory(max_body_bytes=2048)
    before = coord.dump()

    def chunks() -> Iterator[bytes]:  # streamed: no Content-Length to refuse it by
        yield b'{"rounds": 2, "note": "'
        for _ in range(10):
            yield b"x" * 512
        yield b'"}'

    r = coord.http.post(
        "/v1/runs", content=chunks(), headers={**ADMIN_HEADERS, "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and "exceeds the limit of 2048 bytes" in r.json()["detail"]
    assert coord.dump() == before


def test_health_metrics_and_dashboard_files(coord: Coordinator) -> None:
    run_id, (a,) = coord.new_run(1)
    coord.train(run_id, a, 1)
    assert coord.http.get("/healthz").json() == {"status": "ok"}
    text = coord.http.get("/metrics").text
    assert 'fedbpt_coordinator_updates_total{duplicate="false"} 1.0' in text
    assert 'fedbpt_coordinator_rounds_total{result="closed"} 1.0' in text
    assert 'fedbpt_coordinator_runs{state="running"} 1.0' in text
    assert 'route="/v1/runs/{run_id}/rounds/{round_}/updates",status="200"' in text
    for page in ("/", f"/runs/{run_id}"):
        r = coord.http.get(page)
        assert r.status_code == 200 and "/dashboard/static/dashboard.js" in r.text
    # Served from this package, never from a CDN: the machines have no internet.
    assert "http" not in coord.http.get("/").text.replace("http-equiv", "")
    vendor = coord.http.get("/dashboard/static/vendor/chart.umd.min.js")
    assert vendor.status_code == 200 and "Chart" in vendor.text


def test_restart_on_the_same_file_continues(coordinator_factory: Callable[..., Coordinator]) -> None:
    first = coordinator_factory()
    run_id, sites = first.new_run(2, rounds=3)
    for k, site in enumerate(sites):
        first.train(run_id, site, k)
    first.close()
    second = coordinator_factory(db=first.db)
    second.runs[run_id] = sites
    assert second.info(run_id)["round"] == 1
    for k, site in enumerate(sites):
        assert second.train(run_id, site, 10 + k).status_code == 200
    assert [r["state"] for r in second.rounds(run_id)] == ["closed", "closed", "open"]
    assert second.task(run_id, sites[0]).round == 2
    # the client tokens still work and updates of earlier rounds are still recognised
    r = second.post_update(run_id, 0, sites[0], synthetic_update(second.task(run_id, sites[0]), 0))
    assert r.status_code == 200 and r.json()["duplicate"] is True


def test_integers_for_floats_are_accepted_as_json_allows(coord: Coordinator) -> None:
    """JSON has one number type: 1 for a float field is fine (pydantic's strict mode allows it)."""
    run_id, (a,) = coord.new_run(1)
    task = coord.task(run_id, a)
    body = json.loads(synthetic_update(task, 1).model_dump_json())
    body["fitness"] = 1
    body["sigmas"] = [1, 1, 1]
    r = coord.post_update(run_id, 0, a, json.dumps(body))
    assert r.status_code == 200, r.text


def test_the_background_decomposition_is_what_aggregation_uses(coord: Coordinator) -> None:
    """At d = 200 with 10 clients pycma re-decomposes C every other round; the coordinator computes
    that decomposition while clients train, and the aggregation takes it from the cache."""
    from coordinator.es_state import EIGEN_CACHE

    engine = coord.http.app.state.engine  # type: ignore[attr-defined]
    run_id, sites = coord.new_run(10, rounds=4, projection={"intrinsic_dim": 200})
    hits = EIGEN_CACHE.hits
    for round_ in range(4):
        for k, site in enumerate(sites):
            if k == len(sites) - 1:
                engine.wait_background()  # the clients' training time, compressed
            assert coord.train(run_id, site, 100 * round_ + k).status_code == 200
    assert coord.info(run_id)["state"] == "finished"
    assert EIGEN_CACHE.hits - hits >= 1


def test_openapi_schema_is_served(coord: Coordinator) -> None:
    paths = coord.http.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/runs",
        "/v1/runs/{run_id}/task",
        "/v1/runs/{run_id}/rounds/{round_}/updates",
        "/v1/whoami",
    ):
        assert path in paths


def test_client_summaries_for_the_dashboard(coord: Coordinator) -> None:
    run_id, (a, b, _idle) = coord.new_run(3, rounds=2, min_clients=2, round_timeout_s=0.4)
    for round_ in range(2):
        for k, site in enumerate((a, b)):
            assert coord.task(run_id, site, wait=10).round == round_  # idle never answers: deadlines
            metrics = ClientMetrics(train_loss=0.5 - 0.1 * round_, test_accuracy=0.6 + 0.1 * k, n_test=10)
            r = coord.train(run_id, site, seed=10 * round_ + k, metrics=metrics)
            assert r.status_code == 200, r.text
    r = coord.http.get(f"/v1/runs/{run_id}/clients", headers=ADMIN_HEADERS)
    assert r.status_code == 200, r.text
    by_name = {c["name"]: c for c in r.json()}
    assert list(by_name) == ["site-0", "site-1", "site-2"]
    assert by_name["site-0"]["rounds_contributed"] == 2 and by_name["site-0"]["last_round"] == 1
    assert by_name["site-0"]["train_loss"] == pytest.approx(0.4)
    assert by_name["site-1"]["test_accuracy"] == pytest.approx(0.7)
    assert by_name["site-0"]["last_seen"] >= by_name["site-0"]["enrolled_at"]
    idle_row = by_name["site-2"]
    assert (idle_row["rounds_contributed"], idle_row["last_seen"], idle_row["test_accuracy"]) == (
        0,
        None,
        None,
    )
    assert coord.http.get(f"/v1/runs/{run_id}/clients", headers=a.headers).status_code == 403
    assert coord.http.get("/v1/runs/run-nope/clients", headers=ADMIN_HEADERS).status_code == 404


def test_a_run_too_large_to_hold_is_refused_and_nothing_is_stored(coord: Coordinator) -> None:
    before = coord.dump()
    r = coord.http.post("/v1/runs", json={"projection": {"intrinsic_dim": 100_000}}, headers=ADMIN_HEADERS)
    assert r.status_code == 400 and "intrinsic_dim 100000" in r.json()["detail"]
    assert coord.dump() == before
    assert (
        coord.http.post(
            "/v1/runs", json={"projection": {"intrinsic_dim": 4096}}, headers=ADMIN_HEADERS
        ).status_code
        == 201
    )


def test_a_500_dimensional_task_fits_8_kb_with_a_diagonal_and_a_float32_mean(coord: Coordinator) -> None:
    """At the paper's d = 500 the task (state, config, seeds) is 1.3 MB with the full C; with
    `covariance: diagonal` and `mean_dtype: float32` it is under 8 KB on the wire (the body the
    client receives), and the mean is the server's float64 mean rounded to float32."""
    sizes = {}
    for name, options in (
        ("full", {}),
        ("small", {"covariance": "diagonal", "mean_dtype": "float32"}),
    ):
        run_id, (site,) = coord.new_run(1, projection={"intrinsic_dim": 500}, **options)
        r = coord.http.get(f"/v1/runs/{run_id}/task", headers=site.headers)
        assert r.status_code == 200
        sizes[name] = len(r.content)
        task = Task.model_validate_json(r.content)
        assert task.state is not None
        state = coord.http.app.state.engine.runs.state(run_id)[1]
        if name == "small":
            assert task.state.mean.dtype == "float32" and task.state.cov is not None
            np.testing.assert_array_equal(task.state.mean.numpy(), state.mean.astype(np.float32))
    assert sizes["full"] > 1_000_000 and sizes["small"] <= 8_000, sizes
