"""Cross-request batching: requests queued together share forward passes, and each still gets
exactly its own logits (or its own error)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from inference_service.app import create_app
from inference_service.errors import BadRequest
from inference_service.scheduler import Scheduler
from protos import ScoreResponse, TaskSpec
from tests.service.conftest import TEXTS, Zoo, z_request


@pytest.mark.parametrize("name", ["bert", "llama", "st-bert"])
def test_merged_requests_get_their_own_logits(
    zoo: Zoo, name: str, population: Callable[..., np.ndarray]
) -> None:
    scorer = zoo.scorer(name, max_batch_tokens=256)
    requests = [
        z_request(name, population(3, 8)),
        z_request(name, population(2, 8, 1.0), texts=TEXTS[:2]),
        z_request(name, population(4, 8, 2.0), texts=list(reversed(TEXTS))),
    ]
    alone = [scorer.score(r).logits.numpy() for r in requests]
    together = scorer.score_many(requests)
    for got, want in zip(together, alone, strict=True):
        assert isinstance(got, ScoreResponse)
        assert np.abs(got.logits.numpy() - want).max() < 1e-5
    # The three shared their forward passes: fewer than run one by one.
    merged_passes = together[0].stats.forward_passes  # type: ignore[union-attr]
    assert merged_passes < sum(scorer.score(r).stats.forward_passes for r in requests)


def test_a_bad_request_or_another_task_does_not_disturb_the_others(
    zoo: Zoo, population: Callable[..., np.ndarray]
) -> None:
    scorer = zoo.scorer("bert")
    good = z_request("bert", population(2, 8))
    other_task = z_request("bert", population(2, 8)).model_copy(
        update={"task": TaskSpec(template="{input} ! {mask} !", labels=["bad", "great"])}
    )
    bad = z_request("bert", population(2, 8)).model_copy(update={"texts": None, "input_ids": [[10**9]]})
    out = scorer.score_many([good, bad, other_task])
    assert isinstance(out[1], BadRequest) and "vocabulary" in str(out[1])
    assert isinstance(out[0], ScoreResponse) and isinstance(out[2], ScoreResponse)
    assert np.abs(out[0].logits.numpy() - scorer.score(good).logits.numpy()).max() < 1e-5
    assert np.abs(out[2].logits.numpy() - scorer.score(other_task).logits.numpy()).max() < 1e-5


class _Recorder:
    """A merge function that records the groups it was given; the first call blocks until released,
    so that later submissions queue up behind it."""

    def __init__(self) -> None:
        self.groups: list[list[Any]] = []
        self.release = threading.Event()

    def merge(self, items: list[Any]) -> list[Any]:
        if not self.groups:
            self.release.wait(10)
        self.groups.append(list(items))
        return [ValueError(f"bad {i}") if i == "bad" else f"done {i}" for i in items]


def test_scheduler_merges_what_queued_while_the_model_was_busy() -> None:
    async def scenario() -> tuple[list[Any], list[list[Any]]]:
        recorder = _Recorder()
        scheduler = Scheduler(max_queue=16)
        first = asyncio.create_task(scheduler.submit_merged("a", recorder.merge, key="k"))
        await asyncio.sleep(0.2)  # "a" is running; the rest queue behind it
        rest = [
            asyncio.create_task(scheduler.submit_merged(item, recorder.merge, key="k"))
            for item in ("b", "bad", "c")
        ]
        other_key = asyncio.create_task(scheduler.submit_merged("d", recorder.merge, key="other"))
        await asyncio.sleep(0.1)
        recorder.release.set()
        results = await asyncio.gather(first, *rest, other_key, return_exceptions=True)
        await scheduler.stop()
        return results, recorder.groups

    results, groups = asyncio.run(scenario())
    assert groups == [["a"], ["b", "bad", "c"], ["d"]]
    assert results[0] == "done a" and results[1] == "done b" and results[3] == "done c"
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad bad"
    assert results[4] == "done d"


def test_merging_can_be_turned_off() -> None:
    async def scenario() -> list[list[Any]]:
        recorder = _Recorder()
        scheduler = Scheduler(max_queue=16, merge=False)
        first = asyncio.create_task(scheduler.submit_merged("a", recorder.merge, key="k"))
        await asyncio.sleep(0.2)
        rest = [asyncio.create_task(scheduler.submit_merged(i, recorder.merge, key="k")) for i in "bc"]
        await asyncio.sleep(0.1)
        recorder.release.set()
        await asyncio.gather(first, *rest)
        await scheduler.stop()
        return recorder.groups

    assert asyncio.run(scenario()) == [["a"], ["b"], ["c"]]


@pytest.mark.parametrize(("setting", "expected"), [(None, False), (True, True), (False, False)])
def test_auto_merging_is_off_for_transformers_on_cpu(zoo: Zoo, setting: bool | None, expected: bool) -> None:
    settings = zoo.settings("bert", cross_request_batching=setting)
    app = create_app(settings, backend=zoo.backend("bert"))
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        assert app.state.service.scheduler.merging is expected
