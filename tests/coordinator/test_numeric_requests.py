"""The coordinator's arithmetic on request numbers never ends in a 5xx (a real process, hypothesis).

Where the coordinator computes with what a request carries — a run's ``sigma0``/``alpha`` (the
initial state), the clients' ``n_samples`` and fitness (the server step), their validation and
test metrics (count-weighted means, the selection of the best state), evaluation reports — each
example builds a run with numbers drawn across the whole finite float range (subnormals, 1e308) and
integer counts up to 2**62, lets two sites answer a round with them, and reads back every route
that shows them: no answer is a 5xx, and every JSON answer parses (no NaN/Inf tokens). A refusal
(4xx) is fine; an accepted number must come back finite. The round trip of updates, the admission
bounds and the never-wedge rules have their own tests (test_admission, test_never_wedge,
test_hostile_site); this one covers request handling.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import ClientMetrics, Task
from tests.coordinator.conftest import ADMIN_HEADERS, bearer, small_config, synthetic_update
from tests.coordinator.test_process import Server, server

CASES = [12, pytest.param(200, marks=pytest.mark.slow)]

finite = st.floats(allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=5e-324, max_value=1.7e308, allow_nan=False, allow_infinity=False)
unit = st.floats(0, 1)
counts = st.integers(0, 2**62)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with server(tmp_path_factory.mktemp("numeric-coordinator")) as s:
        s.start()
        yield s


def _strict_json(text: str) -> Any:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-finite {token} in an answer: {text[:300]}")

    return json.loads(text, parse_constant=refuse)


def _check(answer: Any, what: str, seen: dict[str, dict[int, int]] | None = None) -> None:
    if seen is not None:
        seen.setdefault(what, {}).setdefault(answer.status_code, 0)
        seen[what][answer.status_code] += 1
    assert answer.status_code < 500, (what, answer.status_code, answer.text[:500])
    if answer.headers.get("content-type", "").startswith("application/json"):
        _strict_json(answer.text)


metrics = st.builds(
    ClientMetrics,
    train_loss=st.one_of(st.none(), finite),
    train_accuracy=st.one_of(st.none(), unit),
    val_loss=st.one_of(st.none(), finite),
    val_accuracy=st.one_of(st.none(), unit),
    n_val=counts,
    seconds=st.floats(0, 1e300),
)
eval_report = st.fixed_dictionaries(
    {
        "test_accuracy": unit,
        "n_test": st.integers(1, 2**62),
        "test_loss": finite,
        "val_loss": finite,
        "val_accuracy": unit,
        "n_val": st.integers(1, 2**62),
    }
)


@pytest.mark.parametrize("cases", CASES)
def test_request_numbers_never_make_a_5xx(coordinator: Server, cases: int) -> None:
    s = coordinator
    seen: dict[str, dict[int, int]] = {}

    @settings(max_examples=cases, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        sigma0=st.one_of(positive, st.just(1.0)),
        alpha=st.one_of(positive, st.just(1.0)),
        sites=st.lists(
            st.tuples(metrics, st.integers(1, 2**62), st.floats(-1e9, 1e9), eval_report),
            min_size=2,
            max_size=2,
        ),
    )
    def one(
        sigma0: float, alpha: float, sites: list[tuple[ClientMetrics, int, float, dict[str, Any]]]
    ) -> None:
        config = small_config(
            rounds=1, min_clients=2, projection={"intrinsic_dim": 4, "sigma0": sigma0, "alpha": alpha}
        )
        created = s.request("POST", "/v1/runs", json=config, headers=ADMIN_HEADERS)
        _check(created, "create", seen)
        if created.status_code != 201:
            return
        run_id = created.json()["run_id"]
        tokens = []
        for k in range(2):
            enrolled = s.request(
                "POST", f"/v1/runs/{run_id}/clients", json={"name": f"s{k}"}, headers=ADMIN_HEADERS
            )
            _check(enrolled, "enrol")
            tokens.append(enrolled.json()["token"])
        _check(s.request("POST", f"/v1/runs/{run_id}/start", headers=ADMIN_HEADERS), "start")
        for k, (site_metrics, n_samples, fitness, _) in enumerate(sites):
            answer = s.request(
                "GET", f"/v1/runs/{run_id}/task", params={"wait": 0}, headers=bearer(tokens[k])
            )
            _check(answer, "task")
            task = Task.model_validate(answer.json())
            if task.state is None:
                continue
            update = synthetic_update(task, k, fitness=fitness, n_samples=n_samples, metrics=site_metrics)
            path = f"/v1/runs/{run_id}/rounds/{task.round}"
            _check(
                s.request(
                    "POST",
                    f"{path}/updates",
                    content=update.model_dump_json(),
                    headers={**bearer(tokens[k]), "Content-Type": "application/json"},
                ),
                "update",
                seen,
            )
        for k, (_, _, _, report) in enumerate(sites):
            _check(
                s.request("POST", f"/v1/runs/{run_id}/rounds/0/eval", json=report, headers=bearer(tokens[k])),
                "eval",
                seen,
            )
        for path in ("", "/rounds", "/prompt", "/prompt?state=final", "/prompt?state=0", "/clients"):
            _check(s.request("GET", f"/v1/runs/{run_id}{path}", headers=ADMIN_HEADERS), path or "run")
        _check(s.request("GET", "/metrics"), "metrics")
        _check(s.request("GET", "/v1/runs", headers=ADMIN_HEADERS), "runs")

    one()
    assert s.request("GET", "/healthz").status_code == 200
    # Not vacuous: runs were created and most extreme updates and reports were taken in.
    assert seen["create"].get(201, 0) > cases // 2 and seen["update"].get(200, 0) > cases // 2, seen
    assert seen["eval"].get(200, 0) > 0, seen
