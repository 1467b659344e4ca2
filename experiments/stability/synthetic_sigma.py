"""Why the server's step size grows in FedBPT runs: a synthetic check, no model, seconds to run.

The sites run fedbpt's own local round (``fed_clients.training.train_locally``: pycma from the
global state, ``local_iters`` generations) and the coordinator's own server step
(``coordinator.aggregators.aggregate``) on a stand-in objective: logits linear in z plus noise,
the clean inputs along one direction, the perturbed copy along another (different inputs, so a
prompt can move them apart). With perturbation the local fitness is FedBPT's ratio
loss(clean) / loss(perturbed), which also falls when the perturbed loss rises; every site finds
the same such direction, the merged means keep stepping along it, and the server's cumulative
step-size adaptation reads consistent long steps: sigma grows round after round. Without
perturbation (or on a flat objective) it does not.

    .venv/bin/python experiments/stability/synthetic_sigma.py

Prints sigma after every other round for each setting (experiments/stability/README.md has a run).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from coordinator.aggregators import aggregate, make_aggregator
from coordinator.aggregators.base import Contribution
from fed_clients.perturb import PerturbedCopy
from fed_clients.training import train_locally
from protos import ProjectionSpec, RunConfig

D, SITES, ITERS, ROUNDS, EXAMPLES = 100, 10, 8, 20, 6
Weights = Literal["rank", "samples", "equal"]


def sigmas(*, perturb: bool, signal: bool, weights: Weights, seed: int = 0) -> list[float]:
    """The clients' sigma after each round of one synthetic federation."""
    config = RunConfig(
        projection=ProjectionSpec(intrinsic_dim=D), rounds=ROUNDS, local_iters=ITERS, server_weights=weights
    )
    aggregator = make_aggregator(config)
    state = aggregator.initial_state()
    rng = np.random.default_rng(seed)
    scale = 1.0 if signal else 0.0  # flat: the logits are noise whatever z is
    clean_dir, perturbed_dir = (rng.normal(size=(D, 2)) / np.sqrt(D) * scale for _ in range(2))
    labels = [rng.integers(0, 2, size=EXAMPLES) for _ in range(SITES)]
    out = []
    for r in range(ROUNDS):
        task_state = aggregator.payload(state)
        updates = []
        for i in range(SITES):
            noise = np.random.default_rng([seed, r, i])

            def score(
                z: np.ndarray, parts: Sequence[tuple[object, object]], noise: np.random.Generator = noise
            ) -> list[np.ndarray]:
                return [
                    noise.normal(size=(z.shape[0], EXAMPLES, 2)) * 0.3 + (z @ w)[:, None, :]
                    for w, _ in zip((clean_dir, perturbed_dir), parts, strict=False)
                ]

            copy = PerturbedCopy([[2]] * EXAMPLES, None) if perturb else None
            local = train_locally(
                score, task_state, [[1]] * EXAMPLES, labels[i], 5, ITERS, 17 * r + i, perturbed=copy
            )
            updates.append(
                Contribution(f"site-{i}", local.mean, local.fitness, tuple(local.sigmas), local.mu, EXAMPLES)
            )
        state = aggregate(config, state, updates).state
        out.append(state.sigma)
    return out


def main() -> None:
    print(
        f"d = {D}, {SITES} sites, {ITERS} local generations, {ROUNDS} rounds; sigma after rounds 1, 3, ..., {ROUNDS}"
    )
    for signal in (True, False):
        for perturb in (False, True):
            for weights in ("samples", "rank"):  # type: Weights
                s = sigmas(perturb=perturb, signal=signal, weights=weights)
                name = f"{'signal' if signal else 'flat'}, {'perturbation' if perturb else 'no perturbation'}, {weights}"
                print(f"{name:<40} " + " ".join(f"{x:.2f}" for x in s[::2]) + f"  final {s[-1]:.2f}")


if __name__ == "__main__":
    main()
