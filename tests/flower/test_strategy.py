"""The strategy in one process against a stand-in Grid (tests/flower/fakes.py): it hands out the
coordinator's tasks and reaches the coordinator's states for the same updates, and a restarted
ServerApp continues from the checkpoint to the same end.

Tolerance: states are compared with ``rtol=1e-9`` (and ``atol=1e-12`` for entries near zero).
Both drivers run the same numpy and pycma code on the same numbers here, so they agree to the last
bit; the margin only keeps the test independent of how a BLAS build rounds. A wrong seed, sample or
contribution order moves the mean by about sigma (~1), nine orders of magnitude more.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.es_state import ServerState
from coordinator.store import Store
from flower_app import checkpoint
from flower_app.checkpoint import CheckpointError
from flower_app.strategy import FINAL_PROMPT_FILE, PROMPT_FILE, FedBPTStrategy
from protos import PromptResponse, RunConfig, Task
from tests.coordinator.conftest import ADMIN_HEADERS, JSON, Coordinator
from tests.flower.fakes import FakeGrid, synthetic_answer, synthetic_report

RTOL, ATOL = 1e-9, 1e-12
# Enrolled in this order; the name order (alpha, mid, zeta) is what sampling and aggregation use.
NAMES = ["zeta", "alpha", "mid"]
NODES = {9001: "zeta", 17: "alpha", 5555: "mid"}
CONFIG: dict[str, Any] = {
    "rounds": 4,
    "projection": {"intrinsic_dim": 16},
    "local_iters": 3,
    "client_seeds": "per_client",
    "frac": 0.67,  # two of three sites a round: the sampling matters
    "eval_every": 2,
}


def coordinator_run(coord: Coordinator, **config: Any) -> tuple[ServerState, PromptResponse, list[Task]]:
    """The coordinator (its real app, in process) with sites answering synthetically."""
    config = {**CONFIG, **config}
    run_id = coord.create_run(**config)
    sites = coord.enrol(run_id, len(NAMES), names=NAMES)
    coord.start(run_id)
    tasks: list[Task] = []
    done: dict[str, Task] = {}
    while len(done) < len(sites):
        for site in sites:
            task = coord.task(run_id, site)
            if task.kind == "train":
                tasks.append(task)
                assert task.round is not None
                ack = coord.post_update(run_id, task.round, site, synthetic_answer(task, site.name))
                assert ack.status_code == 200, ack.text
            elif task.kind == "done" and site.name not in done:
                done[site.name] = task
    last = CONFIG["rounds"] - 1
    for site in sites:
        report = synthetic_report(done[site.name], site.name).model_dump_json()
        r = coord.http.post(
            f"/v1/runs/{run_id}/rounds/{last}/eval", content=report, headers={**site.headers, **JSON}
        )
        assert r.status_code == 200, r.text
    prompt = coord.http.get(f"/v1/runs/{run_id}/prompt", headers=ADMIN_HEADERS)
    assert prompt.status_code == 200, prompt.text
    coord.close()
    store = Store(coord.db)
    try:
        _, state = store.load_state(run_id)
    finally:
        store.close()
    return state, PromptResponse.model_validate_json(prompt.content), tasks


def assert_same_state(a: ServerState, b: ServerState) -> None:
    np.testing.assert_allclose(a.mean, b.mean, rtol=RTOL, atol=ATOL)
    assert a.sigma == pytest.approx(b.sigma, rel=RTOL)
    assert a.es is not None and b.es is not None
    assert a.es.numbers().keys() == b.es.numbers().keys()
    for name, value in a.es.numbers().items():
        assert value == pytest.approx(b.es.numbers()[name], rel=RTOL, abs=ATOL), name
    for name, array in a.es.arrays().items():
        np.testing.assert_allclose(array, b.es.arrays()[name], rtol=RTOL, atol=ATOL, err_msg=name)


def task_keys(tasks: list[Task]) -> list[tuple[int, int, bool]]:
    return sorted((t.round or 0, t.client_seed or 0, t.evaluate) for t in tasks if t.kind == "train")


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("aggregator", ["cmaes", "shared_es"])
def test_strategy_reaches_the_coordinators_states(
    tmp_path: Path, coordinator_factory: Callable[..., Coordinator], aggregator: str
) -> None:
    expected_state, expected_prompt, expected_tasks = coordinator_run(
        coordinator_factory(), aggregator=aggregator
    )

    grid = FakeGrid(dict(NODES))
    config = RunConfig(**{**CONFIG, "aggregator": aggregator})
    strategy = FedBPTStrategy(config=config, sites=3, checkpoint_dir=tmp_path / "run")
    strategy.run(grid)  # type: ignore[arg-type]

    # The same tasks: sample, per-site seeds (keyed on the names), evaluate flags.
    assert task_keys(grid.sent) == task_keys(expected_tasks)
    assert len({t.client_seed for t in expected_tasks}) > 2
    assert_same_state(strategy.progress.state, expected_state)
    prompt = strategy.prompt("selected")
    assert (prompt.round, prompt.chosen) == (expected_prompt.round, expected_prompt.chosen)
    assert prompt.val_loss == pytest.approx(expected_prompt.val_loss, rel=RTOL)
    np.testing.assert_allclose(prompt.z.numpy(), expected_prompt.z.numpy(), rtol=RTOL, atol=ATOL)
    assert prompt.model_dump(exclude={"z", "val_loss"}) == expected_prompt.model_dump(
        exclude={"z", "val_loss"}
    )
    on_disk = PromptResponse.model_validate_json((tmp_path / "run" / PROMPT_FILE).read_bytes())
    assert on_disk.model_dump_json() == prompt.model_dump_json()


@pytest.mark.usefixtures("flower_identity")
def test_a_restarted_server_app_continues_from_the_checkpoint(tmp_path: Path) -> None:
    config = RunConfig(**CONFIG)
    whole = FedBPTStrategy(config=config, sites=3, checkpoint_dir=tmp_path / "whole")
    whole.run(FakeGrid(dict(NODES)))  # type: ignore[arg-type]

    first = FedBPTStrategy(config=config, sites=3, checkpoint_dir=tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="died"):
        first.run(FakeGrid(dict(NODES), fail_on_train=3))  # type: ignore[arg-type]
    saved = checkpoint.load(tmp_path / "resumed", config)
    assert saved is not None and saved.round == 2 and len(saved.rounds) == 2

    # A new ServerApp on the same folder; the SuperNodes reconnected with new node ids.
    second = FedBPTStrategy(config=config, sites=3, checkpoint_dir=tmp_path / "resumed")
    assert second.resumed and second.remaining_rounds == 2
    grid = FakeGrid({4: "mid", 123456789: "zeta", 77: "alpha"})
    second.run(grid)  # type: ignore[arg-type]

    assert sorted({t.round for t in grid.sent if t.kind == "train"}) == [2, 3]
    assert [t.round for t in grid.sent if t.kind == "done"] == [4, 4, 4]
    assert_same_state(second.progress.state, whole.progress.state)
    assert second.progress.validations == whole.progress.validations
    for name in (PROMPT_FILE, FINAL_PROMPT_FILE):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    config = RunConfig(**CONFIG)
    strategy = FedBPTStrategy(config=config, sites=3, checkpoint_dir=tmp_path)
    checkpoint.save(tmp_path, strategy.progress)
    other = RunConfig(**{**CONFIG, "seed": 7})
    with pytest.raises(CheckpointError, match="another checkpoint-dir"):
        FedBPTStrategy(config=other, sites=3, checkpoint_dir=tmp_path)


def test_the_checkpoint_keeps_every_array_and_its_layout(tmp_path: Path) -> None:
    config = RunConfig(**CONFIG)
    strategy = FedBPTStrategy(config=config, sites=3, checkpoint_dir=tmp_path)
    state = strategy.progress.state
    assert state.es is not None
    # pycma keeps B Fortran-ordered; make sure one array in each layout is present.
    state.es.B = np.asfortranarray(state.es.B + np.arange(state.es.B.size).reshape(state.es.B.shape) * 1e-3)
    assert state.es.B.flags.f_contiguous and not state.es.B.flags.c_contiguous
    checkpoint.save(tmp_path, strategy.progress)
    loaded = checkpoint.load(tmp_path, config)
    assert loaded is not None and loaded.state.es is not None
    for name, array in state.es.arrays().items():
        back = loaded.state.es.arrays()[name]
        assert np.array_equal(back, array), name
        assert (back.flags.f_contiguous, back.flags.c_contiguous) == (
            array.flags.f_contiguous,
            array.flags.c_contiguous,
        ), name
    assert loaded.state.es.numbers() == state.es.numbers()
    assert loaded.state.sigma == state.sigma
