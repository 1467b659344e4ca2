"""A real coordinator process, one hostile site among honest ones: extreme values, NaN where the
JSON allows it, wrong shapes, replays, and the most extreme update the coordinator admits. The run
finishes all its rounds with the honest sites, and every state it hands out is finite."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np

from coordinator.admission import STEP_MULTIPLE, sigma_bounds
from protos import Array, ClientMetrics, ClientUpdate, Task
from tests.coordinator.conftest import ADMIN_HEADERS, JSON, bearer, synthetic_update
from tests.coordinator.test_process import Server, get_task, post, prompt, rounds, server, setup_run

ROUNDS = 4


def _hostile_bodies(task: Task) -> dict[str, tuple[str, int]]:
    """(body, expected status) of the uploads the coordinator must refuse."""
    assert task.state is not None and task.config is not None
    d, iters = task.config.dim, task.config.local_iters
    honest = synthetic_update(task, 99)

    def body(**fields: object) -> str:
        return honest.model_copy(update=fields).model_dump_json()

    nan_fitness = _with_field(honest, "fitness", float("nan"))
    return {
        "huge mean": (body(mean=Array.from_numpy(np.full(d, 1e300))), 400),
        "NaN in the mean's bytes": (_with_raw_mean(honest, np.full(d, np.nan)), 422),
        "NaN fitness (a JSON extension Python writes)": (nan_fitness, 422),
        "NaN train loss": (_with_field(honest, "metrics", {"train_loss": float("nan")}), 400),
        "huge sigmas": (body(sigmas=[1e300] * iters), 400),
        "wrong mean shape": (body(mean=Array.from_numpy(np.zeros(d + 1))), 400),
        "wrong number of sigmas": (body(sigmas=[1.0] * (iters + 1)), 400),
        "mu beyond the population": (body(mu=task.config.local_popsize + 1), 400),
        "not JSON": ("{'mean': ", 422),
    }


def _with_raw_mean(update: ClientUpdate, values: np.ndarray) -> str:
    """The update with ``values`` as its mean's bytes (Array.from_numpy refuses to encode NaN)."""
    raw = base64.b64encode(values.astype("<f8").tobytes()).decode()
    fields = json.loads(update.model_dump_json())
    fields["mean"] = {"dtype": "float64", "shape": [len(values)], "data": raw}
    return json.dumps(fields)


def _with_field(update: ClientUpdate, name: str, value: object) -> str:
    """The update's JSON with one field replaced; json.dumps writes float NaN as the token NaN."""
    fields = json.loads(update.model_dump_json())
    fields[name] = value
    body = json.dumps(fields)
    assert "NaN" in body
    return body


def _most_extreme_admitted(task: Task) -> ClientUpdate:
    """Half-way to every bound the coordinator enforces: far mean, largest sigmas, lowest fitness."""
    assert task.state is not None and task.config is not None and task.state.cov is not None
    config, state = task.config, task.state
    cov = state.cov.numpy().astype(np.float64)
    trace = float(np.trace(cov)) if cov.ndim == 2 else float(np.sum(cov))
    _, high = sigma_bounds(config, state.sigma)
    reach = 0.5 * STEP_MULTIPLE * config.local_iters * high * math.sqrt(trace)
    direction = np.ones(config.dim) / math.sqrt(config.dim)
    return ClientUpdate(
        mean=Array.from_numpy(state.mean.numpy() + reach * direction, dtype="float64"),
        fitness=-5e8,
        sigmas=[high * 0.5] * config.local_iters,
        mu=1,
        n_samples=10**9,
        metrics=ClientMetrics(train_loss=0.0),
    )


def _hostile_round(
    s: Server, run_id: str, token: str, round_: int, previous: ClientUpdate | None
) -> ClientUpdate:
    task = get_task(s, run_id, token)
    assert task.kind == "train" and task.round == round_
    path = f"/v1/runs/{run_id}/rounds/{round_}/updates"
    for what, (body, status) in _hostile_bodies(task).items():
        r = s.request("POST", path, content=body, headers={**bearer(token), **JSON})
        assert r.status_code == status, (what, r.status_code, r.text)
    if previous is not None:  # into the closed round before: acknowledged as a duplicate, never applied
        for late in (previous, synthetic_update(task, 7)):
            replayed = post(s, run_id, round_ - 1, token, late)
            assert replayed.status_code == 200 and replayed.json()["duplicate"] is True
    assert post(s, run_id, round_ + 1, token, synthetic_update(task, 5)).status_code == 404  # the future
    extreme = _most_extreme_admitted(task)
    assert post(s, run_id, round_, token, extreme).status_code == 200, "the admitted extreme is taken"
    replay = post(s, run_id, round_, token, extreme)  # the same update again: acknowledged, not re-applied
    assert replay.status_code == 200 and replay.json()["duplicate"] is True
    return extreme


def test_one_hostile_site_cannot_stop_the_run(tmp_path: Path) -> None:
    with server(tmp_path) as s:
        s.start()
        run_id, sites = setup_run(s, 4, rounds=ROUNDS, local_iters=3, min_clients=3, round_timeout_s=30)
        hostile, honest = sites[0][1], [token for _, token in sites[1:]]
        previous: ClientUpdate | None = None
        for round_ in range(ROUNDS):
            previous = _hostile_round(s, run_id, hostile, round_, previous)
            for k, token in enumerate(honest):
                task = get_task(s, run_id, token)
                assert task.kind == "train" and task.round == round_, task
                assert task.state is not None and np.all(np.isfinite(task.state.mean.numpy()))
                assert math.isfinite(task.state.sigma) and task.state.sigma > 0
                assert (
                    post(s, run_id, round_, token, synthetic_update(task, 10 * round_ + k)).status_code == 200
                )
        info = s.request("GET", f"/v1/runs/{run_id}", headers=ADMIN_HEADERS).json()
        assert info["state"] == "finished" and info["rounds_completed"] == ROUNDS, info
        records = rounds(s, run_id)
        assert [r.state for r in records] == ["closed"] * ROUNDS
        assert all(
            r.sigma_after is not None and math.isfinite(r.sigma_after) and r.sigma_after > 0 for r in records
        )
        z = prompt(s, run_id).z.numpy()
        assert np.all(np.isfinite(z))
        done = get_task(s, run_id, honest[0])
        assert done.kind == "done" and done.state is not None and np.all(np.isfinite(done.state.mean.numpy()))
