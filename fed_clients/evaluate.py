"""Accuracy of a prompt (or of no prompt: the zero-shot baseline) on labelled inputs.

Used by the client (the received global mean on its test split; the final prompt on ``done``)
and by ``fedbpt evaluate`` for any prompt, dataset and task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fed_clients.inputs import EncodedSplit
from fed_clients.losses import accuracy, confusion, cross_entropy
from fed_clients.model_api import ModelService, batch_slices
from protos import ProjectionSpec, TaskSpec


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float  # mean cross-entropy
    n: int
    confusion: np.ndarray  # [C, C], rows: true label, columns: predicted

    @property
    def correct(self) -> int:
        return int(np.trace(self.confusion))


def evaluate_prompt(
    model: ModelService,
    spec: TaskSpec,
    split: EncodedSplit,
    z: np.ndarray | None = None,
    projection: ProjectionSpec | None = None,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Score prompt ``z`` [d] (None: zero-shot, no prompt rows) on ``split``.

    ``batch_size`` None: as few calls as the service allows; otherwise calls of that many inputs,
    with ``progress(n_done)`` after each (for a progress bar).
    """
    if len(split) == 0:
        raise ValueError("nothing to evaluate")
    zs = None if z is None else np.asarray(z, dtype=np.float64).reshape(1, -1)
    size = batch_size or len(split)
    parts: list[np.ndarray] = []
    done = 0
    for s in batch_slices([len(x) for x in split.input_ids], size, 10**12):
        parts.append(
            model.score(spec, split.input_ids[s], z=zs, projection=projection if zs is not None else None)
        )
        done += s.stop - s.start
        if progress is not None:
            progress(done)
    logits = np.concatenate(parts, axis=1)
    return EvalResult(
        accuracy=float(accuracy(logits, split.labels)[0]),
        loss=float(cross_entropy(logits, split.labels)[0]),
        n=len(split),
        confusion=confusion(logits, split.labels),
    )
