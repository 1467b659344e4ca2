"""What an update must satisfy, beyond its schema, before the coordinator stores it.

The schema knows types and finiteness; this module knows the run and the round's state, and
refuses (400, nothing stored) what no honest client can send:
- the run's dimension, local iterations and population (``mu``);
- **magnitudes**, so one site cannot poison the server step. A client's local ES starts from the
  round's state N(m, sigma^2 C) and runs ``local_iters`` generations; pycma's CSA changes log sigma
  by at most 1 per generation (its ``max_delta_log_sigma``), and a flat-fitness kick by 0.2 + cs/damps, so
  each reported sigma lies within ``sigma * exp(+-SIGMA_LOG_SLACK * local_iters)``. The local mean
  moves by at most about the sum of those sigmas times a sample's length sqrt(tr C); the bound is
  ``STEP_MULTIPLE`` times that. Fitness must lie within ``MAX_ABS_FITNESS``.
These bounds are wide on purpose (honest updates sit orders of magnitude inside them): they stop
values that would overflow the server step, not subtle attacks, which are ``robust``'s job.
"""

from __future__ import annotations

import math

import numpy as np

from coordinator.errors import BadRequest
from coordinator.es_state import ServerState
from protos import ClientMetrics, ClientUpdate, RunConfig

FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})
SIGMA_LOG_SLACK = 1.25  # per local generation: CSA's clamp of 1 and a flat-fitness kick
STEP_MULTIPLE = 10.0
MAX_ABS_FITNESS = 1e9
MAX_LOG_SPREAD = 100.0


def admit_update(
    config: RunConfig, state: ServerState, update: ClientUpdate, scores_candidates: bool = False
) -> np.ndarray:
    """The update's local mean as float64, or BadRequest saying what is wrong and what is allowed.
    ``scores_candidates``: the run's aggregator takes one loss per candidate (shared_es) instead of
    a local search's result."""
    if update.mean.dtype not in FLOAT_DTYPES:
        raise BadRequest(f"mean must be a float array, got dtype {update.mean.dtype}")
    if update.mean.shape != [config.dim]:
        raise BadRequest(
            f"mean has shape {update.mean.shape}; this run's intrinsic dimension is {config.dim} "
            f"(expected shape [{config.dim}])"
        )
    if scores_candidates:
        _check_losses(config, update)
    elif update.losses is not None:
        raise BadRequest(
            f"this run's aggregator ({config.aggregator}) takes a local search's mean, not losses; "
            "send the update without losses"
        )
    elif len(update.sigmas) != config.local_iters:
        raise BadRequest(
            f"{len(update.sigmas)} sigmas given; this run has local_iters = {config.local_iters} "
            "(one sigma per local generation)"
        )
    if not 1 <= update.mu <= config.local_popsize:
        raise BadRequest(f"mu = {update.mu} is out of range [1, local_popsize = {config.local_popsize}]")
    check_metrics(update.metrics)
    mean = np.asarray(update.mean.numpy(), dtype=np.float64)
    _check_magnitudes(config, state, mean, update)
    return mean


def _check_losses(config: RunConfig, update: ClientUpdate) -> None:
    """shared_es: one loss per candidate, each within MAX_ABS_FITNESS."""
    if update.losses is None or len(update.losses) != config.local_popsize:
        got = "no losses" if update.losses is None else f"{len(update.losses)} losses"
        raise BadRequest(
            f"{got} given; this run's aggregator (shared_es) takes one loss per candidate of the "
            f"task (local_popsize = {config.local_popsize})"
        )
    worst = max(abs(x) for x in update.losses)
    if not worst <= MAX_ABS_FITNESS:
        raise BadRequest(f"loss {worst:g} is outside [-{MAX_ABS_FITNESS:g}, {MAX_ABS_FITNESS:g}]")


def sigma_bounds(config: RunConfig, sigma: float) -> tuple[float, float]:
    """The range of local sigmas an honest client of a round with global sigma ``sigma`` reports."""
    # Capped so that long local runs (up to 10,000 generations) cannot overflow the bound itself.
    spread = math.exp(min(SIGMA_LOG_SLACK * config.local_iters, MAX_LOG_SPREAD))
    return sigma / spread, sigma * spread


def max_step(config: RunConfig, state: ServerState) -> float:
    """The farthest an honest local mean lies from the round's global mean."""
    trace = float(np.trace(state.es.C)) if state.es is not None else float(state.dim)
    _, highest = sigma_bounds(config, state.sigma)
    return STEP_MULTIPLE * config.local_iters * highest * math.sqrt(max(trace, 1e-300))


def _check_magnitudes(config: RunConfig, state: ServerState, mean: np.ndarray, update: ClientUpdate) -> None:
    if not np.all(np.isfinite(mean)):
        raise BadRequest("mean must be finite (it has NaN or infinite entries)")
    if not abs(update.fitness) <= MAX_ABS_FITNESS:
        raise BadRequest(f"fitness {update.fitness} is outside [-{MAX_ABS_FITNESS:g}, {MAX_ABS_FITNESS:g}]")
    low, high = sigma_bounds(config, state.sigma)
    outside = [s for s in update.sigmas if not low <= s <= high]
    if outside:
        raise BadRequest(
            f"local sigma {outside[0]:g} is impossible from this round's sigma {state.sigma:g} in "
            f"{config.local_iters} local generations (allowed: [{low:.3g}, {high:.3g}])"
        )
    distance = float(np.linalg.norm(mean - state.mean))
    limit = max_step(config, state)
    if not distance <= limit:
        raise BadRequest(
            f"mean lies {distance:.3g} from this round's global mean; at most {limit:.3g} is possible "
            "from this round's state"
        )


def check_metrics(metrics: ClientMetrics) -> None:
    """Metrics are recorded and shown: finite, accuracies in [0, 1], counts not negative."""
    if (metrics.val_loss is None) != (metrics.n_val == 0):
        raise BadRequest("metrics.val_loss and metrics.n_val >= 1 go together (n_val = 0: no validation)")
    for name in (
        "train_loss",
        "train_accuracy",
        "test_accuracy",
        "test_loss",
        "val_loss",
        "val_accuracy",
        "seconds",
    ):
        value = getattr(metrics, name)
        if value is not None and not math.isfinite(value):
            raise BadRequest(f"metrics.{name} must be finite, got {value}")
    for name in ("train_accuracy", "test_accuracy", "val_accuracy"):
        value = getattr(metrics, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise BadRequest(f"metrics.{name} must lie in [0, 1], got {value}")
    counts = (
        "n_test",
        "n_val",
        "service_calls",
        "service_rows",
        "service_bytes_sent",
        "service_bytes_received",
    )
    for name in (*counts, "seconds"):
        if getattr(metrics, name) < 0:
            raise BadRequest(f"metrics.{name} must not be negative")
