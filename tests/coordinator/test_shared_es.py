"""``aggregator: shared_es`` through the coordinator's HTTP API on a real SQLite file: a run is the
same CMA-ES, generation for generation, as one persistent pycma ES on the sites' pooled data; a
task's candidates are a function of the state; updates without the right losses are refused and
change nothing; a database of the previous schema is migrated."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cma
import numpy as np
import pytest

from coordinator.aggregators import Contribution
from coordinator.aggregators.shared_es import SharedPopulationES, pooled_losses
from coordinator.store import SCHEMA, Store
from protos import ClientUpdate, PromptResponse, Task
from tests.coordinator.conftest import ADMIN_HEADERS, Coordinator, synthetic_update

DIM, POPSIZE, ROUNDS, SEED = 16, 6, 6, 77
# Each site's private examples: points whose mean squared distance to a candidate is its loss.
EXAMPLES = [np.random.default_rng(k).normal(loc=1.0 + k, size=(n, DIM)) for k, n in enumerate((3, 5, 9))]


def _loss(examples: np.ndarray, x: np.ndarray) -> float:
    return float(np.mean(np.sum((examples - x) ** 2, axis=1)))


def _answer(task: Task, examples: np.ndarray) -> ClientUpdate:
    """What a site sends: one mean loss per candidate, the received mean and sigma unchanged."""
    assert task.state is not None and task.state.candidates is not None
    losses = [_loss(examples, x) for x in task.state.candidates.numpy()]
    return ClientUpdate(
        mean=task.state.mean,
        fitness=min(losses),
        sigmas=[task.state.sigma],
        mu=1,
        n_samples=len(examples),
        losses=losses,
    )


def _persistent_es() -> cma.CMAEvolutionStrategy:
    """One pycma ES with the shared aggregator's options, drawing generation g's samples from
    default_rng([SEED, g]) as the coordinator does."""
    generators: dict[int, np.random.Generator] = {}
    holder: list[cma.CMAEvolutionStrategy] = []

    def randn(*shape: int) -> np.ndarray:
        g = holder[0].countiter if holder else 0
        return generators.setdefault(g, np.random.default_rng([SEED, g])).standard_normal(shape)

    options = {
        "popsize": POPSIZE,
        "maxiter": ROUNDS,
        "CMA_mirrors": 0,
        "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA,
        "seed": float("nan"),
        "randn": randn,
        "verbose": -9,
    }
    holder.append(cma.CMAEvolutionStrategy(np.zeros(DIM), 1.0, options))
    return holder[0]


def _config(**overrides: Any) -> dict[str, Any]:
    return {"aggregator": "shared_es", "rounds": ROUNDS, "local_popsize": POPSIZE, "seed": SEED, **overrides}


def test_a_run_is_one_cma_es_on_the_pooled_data(coord: Coordinator) -> None:
    run_id, sites = coord.new_run(3, **_config())
    reference = _persistent_es()
    pooled = np.concatenate(EXAMPLES)
    for round_ in range(ROUNDS):
        tasks = [coord.task(run_id, site) for site in sites]
        expected = np.array(reference.ask())
        for task in tasks:
            assert task.round == round_ and task.state is not None and task.state.candidates is not None
            assert task.state.cov is None  # nobody searches: the covariance stays on the server
            np.testing.assert_allclose(task.state.candidates.numpy(), expected, rtol=1e-12, atol=1e-12)
        reference.tell(list(expected), [_loss(pooled, x) for x in expected])
        for site, task, examples in zip(sites, tasks, EXAMPLES, strict=True):
            r = coord.post_update(run_id, round_, site, _answer(task, examples))
            assert r.status_code == 200, r.text
    r = coord.http.get(f"/v1/runs/{run_id}/prompt", params={"state": "final"}, headers=ADMIN_HEADERS)
    assert r.status_code == 200, r.text
    final = PromptResponse.model_validate_json(r.content).z.numpy()
    np.testing.assert_allclose(final, reference.mean, rtol=1e-9, atol=1e-12)
    assert _loss(pooled, final) < _loss(pooled, np.zeros(DIM))  # it learned


def test_the_same_state_always_gives_the_same_candidates(
    coordinator_factory: Callable[..., Coordinator],
) -> None:
    first = coordinator_factory()
    run_id, sites = first.new_run(2, **_config())
    a = first.task(run_id, sites[0])
    b = first.task(run_id, sites[1])
    assert a.state is not None and b.state is not None and a.state.candidates is not None
    assert a.state.candidates.shape == [POPSIZE, DIM]
    assert a.state.model_dump_json() == b.state.model_dump_json()
    first.close()
    again = coordinator_factory(db=first.db)  # a restarted coordinator builds the same task
    restarted = again.task(run_id, sites[0]).state
    assert restarted is not None and restarted.model_dump_json() == a.state.model_dump_json()


def test_updates_without_the_right_losses_are_refused_and_change_nothing(coord: Coordinator) -> None:
    run_id, (a, _) = coord.new_run(2, **_config())
    task = coord.task(run_id, a)
    good = json.loads(_answer(task, EXAMPLES[0]).model_dump_json())
    losses = good["losses"]
    cases = [
        ({**good, "losses": None}, 400, "no losses given; this run's aggregator (shared_es) takes one loss"),
        ({**good, "losses": losses[:-1]}, 400, f"{POPSIZE - 1} losses given;"),
        ({**good, "losses": [*losses, 1.0]}, 400, f"{POPSIZE + 1} losses given;"),
        ({**good, "losses": [*losses[:-1], 1e12]}, 400, "loss 1e+12 is outside"),
        ({**good, "losses": [*losses[:-1], float("nan")]}, 422, "losses must be finite"),
    ]
    before = coord.dump()
    for body, status, message in cases:
        r = coord.post_update(run_id, 0, a, json.dumps(body))
        assert r.status_code == status and message in r.text, (body["losses"], r.text)
    assert coord.dump() == before
    assert coord.post_update(run_id, 0, a, json.dumps(good)).status_code == 200

    # Too few candidates for pycma is refused when the run is created.
    r = coord.http.post("/v1/runs", json=_config(local_popsize=2), headers=ADMIN_HEADERS)
    assert r.status_code == 422 and "local_popsize >= 3" in r.text

    # A run whose clients search refuses losses as clearly.
    other, (c,) = coord.new_run(1)
    update = json.loads(synthetic_update(coord.task(other, c), 1).model_dump_json())
    r = coord.post_update(other, 0, c, json.dumps({**update, "losses": [0.5]}))
    assert r.status_code == 400, r.text
    assert "takes a local search's mean, not losses; send the update without losses" in r.text


def test_a_database_of_schema_1_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old_schema = SCHEMA.replace("    losses TEXT,\n", "")
    assert old_schema != SCHEMA
    with sqlite3.connect(path) as conn:
        conn.executescript(old_schema)
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema', '1')")
    store = Store(path)
    store.close()
    with sqlite3.connect(path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(updates)")]
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
    assert "losses" in columns and version == "2"


def test_a_database_of_an_unknown_schema_is_refused_with_both_versions(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA)
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema', '9')")
    with pytest.raises(RuntimeError, match="schema version 9 is not 2"):
        Store(path)


def test_the_step_names_a_contribution_without_one_loss_per_candidate() -> None:
    """Admission refuses these first; the step still says which site and why if one gets through
    (``server_step`` then leaves that contribution out)."""
    short = Contribution("site-a", np.zeros(DIM), 0.5, (1.0,), 1, 4, (0.5,) * (POPSIZE - 1))
    missing = Contribution("site-b", np.zeros(DIM), 0.5, (1.0,), 1, 4, None)
    with pytest.raises(
        ValueError, match=f"^client site-a sent {POPSIZE - 1} losses for {POPSIZE} candidates$"
    ):
        pooled_losses([short], POPSIZE)
    with pytest.raises(ValueError, match=f"^client site-b sent none losses for {POPSIZE} candidates$"):
        pooled_losses([missing], POPSIZE)
    with pytest.raises(
        ValueError, match=r"^shared_es needs at least 3 candidates per generation \(local_popsize\)$"
    ):
        SharedPopulationES(dim=DIM, sigma0=1.0, rounds=3, popsize=2, seed=1)
    # Pooled by n_samples: a site with 3 examples counts three times one with 1.
    a = Contribution("a", np.zeros(DIM), 0.0, (1.0,), 1, 1, (1.0, 0.0, 0.0))
    b = Contribution("b", np.zeros(DIM), 0.0, (1.0,), 1, 3, (0.0, 1.0, 0.0))
    np.testing.assert_allclose(pooled_losses([a, b], 3), [0.25, 0.75, 0.0])


def test_float32_candidates_are_the_float64_ones_rounded() -> None:
    exact = SharedPopulationES(dim=DIM, sigma0=1.0, rounds=3, popsize=POPSIZE, seed=SEED)
    lean = SharedPopulationES(dim=DIM, sigma0=1.0, rounds=3, popsize=POPSIZE, seed=SEED, mean_dtype="float32")
    state = exact.initial_state()
    full, half = exact.payload(state), lean.payload(state)
    assert full.candidates is not None and half.candidates is not None
    assert full.candidates.dtype == "float64" and half.candidates.dtype == half.mean.dtype == "float32"
    np.testing.assert_array_equal(half.candidates.numpy(), full.candidates.numpy().astype(np.float32))
    assert len(half.model_dump_json()) < 0.6 * len(full.model_dump_json())
