"""One round of local training (ALGORITHM.md, client steps 1-4).

Each generation: record sigma, ask lambda candidates, score all of them on the whole local training
set and, when perturbation is on, on the round's perturbed copy (both in ONE call where the service
keeps inputs: the candidates travel once), fitness = loss(clean) / loss(perturbed) (or
loss(clean)), tell. Exactly ``local_iters`` generations are
run (pycma's other stopping rules, which the reference's ``while not stop()`` could also hit, are
not applied, so every client reports the same number of sigmas). Then the final mean is scored
clean and perturbed (one more call) for its fitness and the train loss (the run's loss) and
accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fed_clients.local_es import build_local_es, local_mu
from fed_clients.losses import accuracy, fitness, loss_function
from fed_clients.model_api import ModelService, Part
from fed_clients.perturb import PerturbedCopy
from protos import GlobalState, ProjectionSpec, TaskSpec

log = logging.getLogger(__name__)

# (z [P, d], parts [(input ids, template perturbation or None)]) -> logits [P, B_i, C] per part
ScoreFn = Callable[[np.ndarray, Sequence[Part]], list[np.ndarray]]


@dataclass(frozen=True)
class LocalResult:
    mean: np.ndarray
    fitness: float
    sigmas: list[float]
    mu: int
    train_loss: float
    train_accuracy: float
    fitness_history: list[float]  # best fitness of each generation, for logs


def make_score_fn(model: ModelService, spec: TaskSpec, projection: ProjectionSpec) -> ScoreFn:
    """Bind the model service to one task and projection."""

    def score(z: np.ndarray, parts: Sequence[Part]) -> list[np.ndarray]:
        return model.score_parts(spec, parts, z=z, projection=projection)

    return score


def train_locally(
    score: ScoreFn,
    state: GlobalState,
    input_ids: Sequence[Sequence[int]],
    labels: np.ndarray,
    popsize: int,
    iters: int,
    seed: int,
    loss: str = "ce",
    perturbed: PerturbedCopy | None = None,
) -> LocalResult:
    loss_of = loss_function(loss)

    def objective(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fitness [P], clean logits [P, B, C])."""
        if perturbed is None:
            (clean_logits,) = score(z, [(input_ids, None)])
            return fitness(loss_of(clean_logits, labels), None), clean_logits
        clean_logits, pert_logits = score(z, [(input_ids, None), (perturbed.input_ids, perturbed.template)])
        return fitness(loss_of(clean_logits, labels), loss_of(pert_logits, labels)), clean_logits

    es = build_local_es(state, popsize, iters, seed)
    sigmas: list[float] = []
    history: list[float] = []
    for generation in range(iters):
        sigmas.append(float(es.sigma))  # recorded before ask, as the reference does
        candidates = es.ask()
        values, _ = objective(np.asarray(candidates))
        es.tell(candidates, values.tolist())
        history.append(float(values.min()))
        log.debug("generation %d: sigma %.4g best fitness %.5g", generation, sigmas[-1], history[-1])

    final = np.array(es.mean, dtype=np.float64)
    values, clean_logits = objective(final[None, :])
    return LocalResult(
        mean=final,
        fitness=float(values[0]),
        sigmas=sigmas,
        mu=local_mu(popsize),
        train_loss=float(loss_of(clean_logits, labels)[0]),
        train_accuracy=float(accuracy(clean_logits, labels)[0]),
        fitness_history=history,
    )


@dataclass(frozen=True)
class CandidateScores:
    """A ``shared_es`` round: the task's candidates scored on the local training set."""

    losses: list[float]  # one mean loss per candidate, in the task's order
    train_loss: float  # the best candidate's
    train_accuracy: float


def score_candidates(
    score: ScoreFn,
    candidates: np.ndarray,
    input_ids: Sequence[Sequence[int]],
    labels: np.ndarray,
    loss: str = "ce",
) -> CandidateScores:
    """Score every candidate on the whole local training set in one call (no search, no
    perturbation: the server's ES ranks the candidates by the losses pooled over the sites)."""
    (logits,) = score(np.asarray(candidates, dtype=np.float64), [(input_ids, None)])
    losses = loss_function(loss)(logits, labels)
    best = int(np.argmin(losses))
    return CandidateScores(
        losses=[float(x) for x in losses],
        train_loss=float(losses[best]),
        train_accuracy=float(accuracy(logits, labels)[best]),
    )
