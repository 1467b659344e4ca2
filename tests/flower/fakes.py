"""Stand-ins for the Flower driver's tests: Flower's ``Grid`` in one process, with sites that
answer as the ClientApp would but with synthetic updates (the strategy's logic without processes)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, MessageType

from flower_app.messages import eval_message, read_task, site_answer, update_message
from protos import ClientMetrics, ClientUpdate, EvalReport, Task
from tests.coordinator.conftest import synthetic_update


def site_number(name: str, salt: str) -> int:
    """A stable number from a site name (not Python's per-process salted hash)."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:4], "little")


def synthetic_answer(task: Task, name: str) -> ClientUpdate:
    """A site's update for ``task``: a function of the task (its state and client seed) and the
    site's name only, so two drivers that hand out the same tasks get the same updates."""
    assert task.round is not None and task.client_seed is not None
    rng = np.random.default_rng([task.client_seed, task.round, site_number(name, "val")])
    metrics = ClientMetrics(
        train_loss=float(rng.uniform(0.4, 0.7)),
        val_loss=float(rng.uniform(0.5, 0.9)),
        val_accuracy=float(rng.uniform(0.4, 0.9)),
        n_val=2 + site_number(name, "n_val") % 3,
    )
    seed = task.client_seed + site_number(name, "mean")
    n_samples = 5 + site_number(name, "n") % 7
    assert task.state is not None
    if task.state.candidates is not None:  # shared_es: one loss per candidate, nothing moves
        losses = [float(x) for x in rng.uniform(0.2, 1.0, size=task.state.candidates.shape[0])]
        return ClientUpdate(
            mean=task.state.mean,
            fitness=min(losses),
            sigmas=[task.state.sigma],
            mu=1,
            n_samples=n_samples,
            losses=losses,
            metrics=metrics,
        )
    return synthetic_update(task, seed, n_samples=n_samples, metrics=metrics)


def synthetic_report(task: Task, name: str) -> EvalReport:
    """A site's evaluation of the final state (the ``done`` task)."""
    rng = np.random.default_rng([site_number(name, "final"), int(task.round or 0)])
    return EvalReport(
        test_accuracy=float(rng.uniform(0.5, 0.9)),
        n_test=10,
        val_loss=float(rng.uniform(0.3, 0.9)),
        val_accuracy=0.5,
        n_val=2 + site_number(name, "n_val") % 3,
    )


@dataclass
class FakeGrid:
    """Flower's ``Grid`` as the strategy uses it (node ids, send and receive), with the sites in this
    process: each answers as the ClientApp would, with synthetic updates. ``fail_on_train`` makes
    the n-th train exchange raise, as a ServerApp that dies mid-run."""

    names: dict[int, str]
    fail_on_train: int | None = None
    sent: list[Task] = field(default_factory=list)
    train_exchanges: int = 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.names)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.train_exchanges += 1
            if self.train_exchanges == self.fail_on_train:
                raise RuntimeError("the ServerApp died")
        return [self._answer(m) for m in messages]

    def _answer(self, msg: Message) -> Message:
        name = self.names[msg.metadata.dst_node_id]
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            return Message(site_answer(name), reply_to=msg)
        task = read_task(msg.content)
        self.sent.append(task)
        if kind == MessageType.TRAIN:
            return Message(update_message(synthetic_answer(task, name)), reply_to=msg)
        return Message(eval_message(synthetic_report(task, name)), reply_to=msg)
