"""Property tests over the aggregation's whole admitted input space: any number of contributions,
any dimension, any state reached so far, means, fitnesses and sigmas anywhere within what
coordinator/admission.py accepts, every aggregator and option. The server step always yields a
state the next round can start from (finite mean, sigma > 0, symmetric positive-definite C), or a
clean AggregationError; never a NaN that would reach the store."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.admission import admit_update, max_step, sigma_bounds
from coordinator.aggregators import AggregationError, Contribution, make_aggregator, server_step
from coordinator.aggregators.base import check_state
from coordinator.es_state import ServerState
from protos import Array, ClientUpdate, RunConfig

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def run_configs(draw: st.DrawFn) -> RunConfig:
    aggregator = draw(st.sampled_from(["cmaes", "fedavg", "shared_es"]))
    return RunConfig.model_validate(
        {
            "projection": {"intrinsic_dim": draw(st.integers(1, 12)), "sigma0": draw(st.floats(1e-3, 10.0))},
            "local_iters": draw(st.integers(1, 10)),
            "local_popsize": draw(st.integers(3 if aggregator == "shared_es" else 2, 12)),
            "rounds": draw(st.integers(1, 300)),
            "aggregator": aggregator,
            "server_weights": draw(st.sampled_from(["rank", "samples", "equal"])),
            "server_sigma": draw(st.sampled_from(["reference", "paper"])),
            "robust": draw(st.sampled_from(["off", "clip", "reject"])),
            "sigma_floor": draw(st.none() | st.floats(1e-3, 1.0)),
            "sigma_ceiling": draw(st.none() | st.floats(1.0, 100.0)),
        }
    )


@st.composite
def admitted(draw: st.DrawFn, config: RunConfig, state: ServerState, name: str) -> Contribution:
    """A contribution anywhere in the admitted space, edges included (fractions 0 and 1 of each bound)."""
    if config.aggregator == "shared_es":  # losses of the task's candidates; nothing else moves
        value = st.sampled_from([-1e9, 1e9, 0.0]) | st.floats(-1e9, 1e9)
        losses = tuple(draw(value) for _ in range(config.local_popsize))
        n_samples = draw(st.integers(1, 10**9))
        return Contribution(name, state.mean.copy(), min(losses), (state.sigma,), 1, n_samples, losses)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    direction = rng.normal(size=state.dim)
    direction /= max(float(np.linalg.norm(direction)), 1e-300)
    reach = draw(st.sampled_from([0.0, 1e-9, 1e-3, 0.5, 0.999]) | st.floats(0.0, 0.999))
    mean = state.mean + direction * reach * max_step(config, state)
    low, high = sigma_bounds(config, state.sigma)
    position = st.floats(0.0, 1.0) | st.sampled_from([0.0, 1.0])
    sigmas = tuple(
        float(np.clip(math.exp(math.log(low) + draw(position) * (math.log(high) - math.log(low))), low, high))
        for _ in range(config.local_iters)
    )
    fitness = draw(st.sampled_from([-1e9, 1e9, 0.0]) | st.floats(-1e9, 1e9))
    mu = draw(st.integers(1, config.local_popsize))
    n_samples = draw(st.integers(1, 10**9))
    return Contribution(name, mean, fitness, sigmas, mu, n_samples)


def _admits(config: RunConfig, state: ServerState, c: Contribution) -> bool:
    update = ClientUpdate(
        mean=Array.from_numpy(c.mean, dtype="float64"),
        fitness=c.fitness,
        sigmas=list(c.sigmas),
        mu=c.mu,
        n_samples=c.n_samples,
        losses=None if c.losses is None else list(c.losses),
    )
    scores_candidates = make_aggregator(config).scores_candidates
    admit_update(
        config, state, update, scores_candidates
    )  # raises BadRequest if the generator left the admitted space
    return True


@PROPERTY
@given(data=st.data())
def test_every_admitted_round_yields_a_usable_state_or_a_clean_refusal(data: st.DataObject) -> None:
    config = data.draw(run_configs())
    aggregator = make_aggregator(config, eigenmethod=np.linalg.eigh)
    state = aggregator.initial_state()
    for _ in range(data.draw(st.integers(1, 3))):  # states that have moved, not only state 0
        m = data.draw(st.integers(1, 8))
        contributions = [data.draw(admitted(config, state, f"site-{k}")) for k in range(m)]
        assert all(_admits(config, state, c) for c in contributions)
        try:
            outcome = server_step(aggregator, config, state, contributions)
        except AggregationError:
            return  # a clean refusal: the coordinator fails the run with this reason
        check_state(outcome.state, config.dim)
        assert sorted(outcome.used + outcome.rejected) == sorted(c.client_id for c in contributions)
        state = outcome.state


@PROPERTY
@given(config=run_configs(), count=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_honest_rounds_use_every_contribution(config: RunConfig, count: int, seed: int) -> None:
    """Updates like real clients' (a local step of about one sample, decaying sigmas) are never
    left out by the safety net: it only acts where the step fails."""
    if config.robust != "off":
        config = config.model_copy(update={"robust": "off"})
    aggregator = make_aggregator(config, eigenmethod=np.linalg.eigh)
    state = aggregator.initial_state()
    rng = np.random.default_rng(seed)
    for _ in range(3):
        if config.aggregator == "shared_es":
            contributions = [
                Contribution(
                    f"site-{k}",
                    state.mean.copy(),
                    0.2,
                    (state.sigma,),
                    1,
                    int(rng.integers(1, 100)),
                    tuple(float(x) for x in rng.uniform(0.2, 1.0, size=config.local_popsize)),
                )
                for k in range(count)
            ]
            outcome = server_step(aggregator, config, state, contributions)
            assert outcome.rejected == [] and len(outcome.used) == count
            state = outcome.state
            continue
        contributions = [
            Contribution(
                f"site-{k}",
                state.mean + state.sigma * 0.5 * rng.normal(size=config.dim),
                float(rng.uniform(0.2, 1.0)),
                tuple(state.sigma * 0.97**j for j in range(config.local_iters)),
                max(1, config.local_popsize // 2),
                int(rng.integers(1, 100)),
            )
            for k in range(count)
        ]
        outcome = server_step(aggregator, config, state, contributions)
        assert outcome.rejected == [] and len(outcome.used) == count
        state = outcome.state
