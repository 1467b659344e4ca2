"""Federated validation and selection: the sites' validation loss of every global state picks the
prompt a run hands out (``GET /prompt``, ``?state=selected|final|N``); test metrics never do."""

from __future__ import annotations

import numpy as np
import pytest

from protos import ClientMetrics, PromptResponse, RunInfo
from tests.coordinator.conftest import ADMIN_HEADERS, JSON, Coordinator, Site, synthetic_update

# Validation loss of states 0, 1, 2 (reported with the rounds' updates) and 3 (the final state,
# reported with the final evaluation): state 1 is best. Test accuracy points elsewhere (state 2).
VAL_LOSS = [0.70, 0.50, 0.60, 0.65]
TEST_ACC = [0.50, 0.55, 0.90, 0.60]


def _federate(coord: Coordinator, test_acc: list[float], test_loss: float) -> tuple[str, list[Site]]:
    """Three rounds of two sites reporting VAL_LOSS (site 1 a little worse, with twice the
    examples) and the given test metrics; then the final evaluations."""
    run_id, sites = coord.new_run(2, rounds=3)
    for round_ in range(3):
        for k, site in enumerate(sites):
            task = coord.task(run_id, site)
            metrics = ClientMetrics(
                train_loss=0.6,
                test_accuracy=test_acc[round_],
                test_loss=test_loss,
                n_test=50,
                val_loss=VAL_LOSS[round_] + 0.03 * k,
                val_accuracy=0.7,
                n_val=2 * (k + 1),
            )
            ack = coord.post_update(
                run_id, round_, site, synthetic_update(task, 10 * round_ + k, metrics=metrics)
            )
            assert ack.status_code == 200, ack.text
    for k, site in enumerate(sites):
        report = {"test_accuracy": test_acc[3], "n_test": 50, "test_loss": test_loss}
        report |= {"val_loss": VAL_LOSS[3] + 0.03 * k, "val_accuracy": 0.7, "n_val": 2 * (k + 1)}
        r = coord.http.post(f"/v1/runs/{run_id}/rounds/2/eval", json=report, headers=site.headers)
        assert r.status_code == 200, r.text
    return run_id, sites


def _prompt(coord: Coordinator, run_id: str, query: str = "") -> PromptResponse:
    r = coord.http.get(f"/v1/runs/{run_id}/prompt{query}", headers=ADMIN_HEADERS)
    assert r.status_code == 200, r.text
    return PromptResponse.model_validate_json(r.content)


def test_the_state_with_the_lowest_validation_loss_is_handed_out(coord: Coordinator) -> None:
    run_id, _ = _federate(coord, TEST_ACC, 0.5)
    selected = _prompt(coord, run_id)
    assert (selected.round, selected.chosen) == (1, "selected")
    # Weighted by n_val: (0.50 * 2 + 0.53 * 4) / 6.
    assert selected.val_loss == pytest.approx((0.50 * 2 + 0.53 * 4) / 6)
    assert np.array_equal(selected.z.numpy(), _prompt(coord, run_id, "?state=1").z.numpy())
    final = _prompt(coord, run_id, "?state=final")
    assert (final.round, final.chosen) == (3, "final")
    assert final.val_loss == pytest.approx((0.65 * 2 + 0.68 * 4) / 6)
    assert not np.array_equal(final.z.numpy(), selected.z.numpy())
    start = _prompt(coord, run_id, "?state=0")
    assert (start.round, start.chosen) == (0, "state") and not start.z.numpy().any()

    info = RunInfo.model_validate(coord.info(run_id))
    assert info.selected_state == 1 and info.selected_val_loss == pytest.approx(selected.val_loss)
    assert info.best_accuracy == pytest.approx(0.90)  # best-by-test is reported, never selected
    rounds = coord.rounds(run_id)
    assert [r["val_loss"] for r in rounds] == pytest.approx(
        [(v * 2 + (v + 0.03) * 4) / 6 for v in VAL_LOSS[:3]]
    )
    assert [r["n_val"] for r in rounds] == [6, 6, 6]
    assert [r["val_accuracy"] for r in rounds] == pytest.approx([0.7, 0.7, 0.7])
    assert rounds[-1]["final_val_loss"] == pytest.approx(final.val_loss)


def test_poisoned_test_metrics_do_not_change_the_selection(coord: Coordinator) -> None:
    """Two runs with the same updates and validation, one with its test metrics turned upside down:
    the same state and the same z are handed out."""
    clean, _ = _federate(coord, TEST_ACC, 0.5)
    poisoned, _ = _federate(coord, [1.0 - a for a in TEST_ACC[::-1]], 9.0)
    a, b = _prompt(coord, clean), _prompt(coord, poisoned)
    assert a.round == b.round == 1
    assert np.array_equal(a.z.numpy(), b.z.numpy())
    assert (
        RunInfo.model_validate(coord.info(clean)).best_accuracy
        != RunInfo.model_validate(coord.info(poisoned)).best_accuracy
    )


def test_without_validation_the_final_state_is_handed_out(coord: Coordinator) -> None:
    run_id, sites = coord.new_run(1, rounds=2)
    for _ in range(2):
        assert coord.train(run_id, sites[0], seed=1).status_code == 200
    prompt = _prompt(coord, run_id)
    assert (prompt.round, prompt.chosen, prompt.val_loss) == (2, "final", None)
    assert RunInfo.model_validate(coord.info(run_id)).selected_state is None


def test_bad_state_queries_and_validation_reports_are_refused_and_change_nothing(coord: Coordinator) -> None:
    run_id, sites = _federate(coord, TEST_ACC, 0.5)
    before = coord.dump()
    for query, status in (
        ("?state=9", 404),
        ("?state=best", 400),
        ("?state=-1", 400),
        ("?state=²", 400),
        ("?state=١", 400),
    ):  # Unicode digits (schemathesis found "²": a 500)
        r = coord.http.get(f"/v1/runs/{run_id}/prompt{query}", headers=ADMIN_HEADERS)
        assert r.status_code == status, (query, r.text)
        assert "state" in r.json()["detail"]
    # A validation loss without a count, a count without a loss, or nothing at all: 422.
    for report in ('{"val_loss": 0.1}', '{"n_val": 3}', "{}", '{"val_loss": NaN, "n_val": 2}'):
        r = coord.http.post(
            f"/v1/runs/{run_id}/rounds/2/eval", content=report, headers={**sites[0].headers, **JSON}
        )
        assert r.status_code == 422, (report, r.text)
    assert coord.dump() == before


def test_an_update_with_half_a_validation_is_refused(coord: Coordinator) -> None:
    run_id, sites = coord.new_run(1, rounds=1)
    task = coord.task(run_id, sites[0])
    before = coord.dump()
    for metrics in (
        ClientMetrics(val_loss=0.3),
        ClientMetrics(n_val=4),
        ClientMetrics(val_loss=0.3, n_val=2, val_accuracy=1.5),
    ):
        r = coord.post_update(run_id, 0, sites[0], synthetic_update(task, 1, metrics=metrics))
        assert r.status_code == 400, r.text
        assert "val" in r.json()["detail"]
    assert coord.dump() == before


def test_validation_counts_beyond_int64_when_summed_still_weigh(coord: Coordinator) -> None:
    """Two sites may each report up to 2**62 validation examples (admission's bound); their sum
    overflows SQLite's 64-bit SUM. Found by test_numeric_requests' 200-case run: every read of the
    run (GET /v1/runs, /v1/runs/{id}) answered 500. Breaks caught: SUM(n) in
    Store.validation_by_state (sqlite3.OperationalError: integer overflow)."""
    run_id, sites = coord.new_run(2, rounds=1)
    for k, site in enumerate(sites):
        metrics = ClientMetrics(train_loss=0.6, val_loss=0.5 + 0.25 * k, val_accuracy=0.5, n_val=2**62)
        task = coord.task(run_id, site)
        assert (
            coord.post_update(run_id, 0, site, synthetic_update(task, k, metrics=metrics)).status_code == 200
        )
    info = RunInfo.model_validate(coord.info(run_id))
    assert info.selected_state == 0 and info.selected_val_loss == pytest.approx(0.625)
    assert coord.rounds(run_id)[0]["n_val"] == 2**63
    assert coord.http.get("/v1/runs", headers=ADMIN_HEADERS).status_code == 200
