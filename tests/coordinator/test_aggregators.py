"""The aggregators' parts that test_aggregation.py does not reach through the reference loop: what
a client receives of a state (``payload``), the covariance precomputed while clients train
(``pending_decomposition``), sigma' for clients of different local populations and the paper's
Eq. 6 for two clients, and the carried-over state of a round without contributions."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest

from coordinator.aggregators import AggregationError, Contribution, Step, make_aggregator, server_step
from coordinator.aggregators.base import check_state, screen
from coordinator.aggregators.cmaes import ServerCMAES, paper_server_sigma, reference_server_sigma
from coordinator.aggregators.fedavg import FedAvg
from coordinator.aggregators.shared_es import SharedPopulationES
from coordinator.es_state import ServerState
from protos import ProjectionSpec, RunConfig

DIM = 30


def _contribution(
    k: int, mean: np.ndarray, *, fitness: float = 0.5, sigmas: tuple[float, ...] = (1.0,), mu: int = 3
) -> Contribution:
    return Contribution(f"site-{k}", mean, fitness, sigmas, mu, 10)


def _later_state(agg: ServerCMAES, rounds: int = 3) -> ServerState:
    """A state some rounds in, whose C is no longer the identity."""
    rng = np.random.default_rng(1)
    state = agg.initial_state()
    for _ in range(rounds):
        cs = [
            _contribution(k, state.mean + rng.normal(size=DIM), fitness=float(rng.uniform()))
            for k in range(4)
        ]
        state = agg.aggregate(state, cs).state
    assert state.es is not None and not np.allclose(state.es.C, np.eye(DIM))
    return state


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_full_covariance_is_sent_in_the_runs_precision(dtype: str) -> None:
    agg = ServerCMAES(dim=DIM, sigma0=1.0, rounds=20, local_popsize=6, covariance_dtype=dtype)
    state = _later_state(agg)
    assert state.es is not None
    sent = agg.payload(state)
    assert sent.cov is not None and sent.cov.dtype == dtype and sent.cov.shape == [DIM, DIM]
    np.testing.assert_array_equal(sent.cov.numpy(), state.es.C.astype(dtype))
    assert sent.mean.dtype == "float64"  # the mean is never rounded, whatever the covariance's precision
    np.testing.assert_array_equal(sent.mean.numpy(), state.mean)
    assert sent.sigma == state.sigma


def test_the_diagonal_covariance_is_only_cs_diagonal() -> None:
    agg = ServerCMAES(dim=DIM, sigma0=1.0, rounds=20, local_popsize=6, covariance="diagonal")
    state = _later_state(agg)
    assert state.es is not None
    sent = agg.payload(state)
    assert sent.cov is not None and sent.cov.shape == [DIM]
    np.testing.assert_array_equal(sent.cov.numpy(), np.diag(state.es.C).astype(np.float32))


def test_the_low_rank_covariance_is_exact_along_cs_farthest_directions() -> None:
    agg = ServerCMAES(
        dim=DIM, sigma0=1.0, rounds=20, local_popsize=6, covariance="lowrank", covariance_rank=3
    )
    state = _later_state(agg)
    assert state.es is not None
    sent = agg.payload(state)
    assert sent.cov is None and sent.cov_lowrank is not None and sent.cov_lowrank.vectors.shape == [3, DIM]
    eigenvalues = np.linalg.eigvalsh(state.es.C)
    farthest = np.argsort(-np.abs(np.log(eigenvalues / np.median(eigenvalues))))[:3]
    np.testing.assert_allclose(
        sorted(sent.cov_lowrank.values.numpy()), sorted(eigenvalues[farthest]), rtol=1e-6
    )
    dense = sent.cov_lowrank.dense()
    for v in sent.cov_lowrank.vectors.numpy():  # C and its form agree along the kept directions
        assert float(v @ dense @ v) == pytest.approx(float(v @ state.es.C @ v), rel=1e-5)
    identity = ServerCMAES(dim=DIM, sigma0=1.0, rounds=20, local_popsize=6, covariance="identity")
    bare = identity.payload(state)
    assert bare.cov is None and bare.cov_lowrank is None and bare.sigma == state.sigma


def test_a_float32_mean_is_the_servers_mean_rounded() -> None:
    agg = ServerCMAES(dim=DIM, sigma0=1.0, rounds=20, local_popsize=6, mean_dtype="float32")
    state = _later_state(agg)
    sent = agg.payload(state)
    assert sent.mean.dtype == "float32" and np.any(state.mean != 0)
    np.testing.assert_array_equal(sent.mean.numpy(), state.mean.astype(np.float32))


def test_a_state_without_an_es_is_sent_without_a_covariance() -> None:
    """A cmaes run's state as FedAvg keeps it (es None, C = I): the payload carries no matrix."""
    agg = ServerCMAES(dim=DIM, sigma0=1.0, rounds=20, local_popsize=6)
    state = ServerState(mean=np.linspace(-1, 1, DIM), sigma=0.5, es=None)
    sent = agg.payload(state)
    assert sent.cov is None
    np.testing.assert_array_equal(sent.mean.numpy(), state.mean)
    fedavg = FedAvg(dim=DIM, sigma=0.5).payload(state)
    assert fedavg.cov is None and fedavg.sigma == 0.5 and fedavg.mean.dtype == "float64"
    np.testing.assert_array_equal(fedavg.mean.numpy(), state.mean)


def test_built_by_hand_the_server_es_is_the_reference() -> None:
    """Built with only the required arguments, the server ES is the reference's (rank weights over
    the fitnesses, the reference sigma', the full C in float32; a RunConfig's own default weights are
    "samples"): the same step, bit for bit, and the same payload as a config that says so."""
    config = RunConfig(
        projection=ProjectionSpec(intrinsic_dim=DIM), rounds=20, local_popsize=6, server_weights="rank"
    )
    by_hand = ServerCMAES(dim=DIM, sigma0=1.0, rounds=20, local_popsize=6)
    from_config = ServerCMAES.from_config(config)
    state = _later_state(by_hand, rounds=1)
    rng = np.random.default_rng(3)
    cs = [
        Contribution(
            f"site-{k}", state.mean + rng.normal(size=DIM), float(rng.uniform()), (0.9, 0.8), 3, 5 + 10 * k
        )
        for k in range(3)
    ]
    a, b = by_hand.aggregate(state, cs), from_config.aggregate(state, cs)
    assert a.server_sigma == b.server_sigma
    np.testing.assert_array_equal(a.state.mean, b.state.mean)
    assert a.state.es is not None and b.state.es is not None
    np.testing.assert_array_equal(a.state.es.C, b.state.es.C)
    assert by_hand.payload(a.state).model_dump_json() == from_config.payload(a.state).model_dump_json()
    assert by_hand.payload(a.state).cov is not None and by_hand.payload(a.state).cov.dtype == "float32"


def test_a_configured_covariance_form_reaches_the_payload() -> None:
    config = RunConfig(
        projection=ProjectionSpec(intrinsic_dim=DIM),
        rounds=20,
        covariance="diagonal",
        covariance_dtype="float64",
    )
    agg = ServerCMAES.from_config(config)
    state = _later_state(agg)
    assert state.es is not None
    sent = agg.payload(state)
    assert sent.cov is not None and (sent.cov.dtype, sent.cov.shape) == ("float64", [DIM])
    np.testing.assert_array_equal(sent.cov.numpy(), np.diag(state.es.C))


def test_a_configured_rank_and_mean_dtype_reach_the_payload() -> None:
    """``covariance_rank`` and ``mean_dtype`` travel from the run's config to what sites receive.
    Breaks seen to fail (mutmut, session 10): ``from_config`` passing None for either or leaving
    either out (the rank then falls back to 8, the mean to float64)."""
    config = RunConfig(
        projection=ProjectionSpec(intrinsic_dim=DIM),
        rounds=20,
        covariance="lowrank",
        covariance_rank=3,
        mean_dtype="float32",
    )
    agg = ServerCMAES.from_config(config)
    sent = agg.payload(_later_state(agg))
    assert sent.mean.dtype == "float32" and sent.mean.shape == [DIM]
    assert sent.cov is None and sent.cov_lowrank is not None
    assert (sent.cov_lowrank.vectors.shape, sent.cov_lowrank.values.shape) == ([3, DIM], [3])


def test_a_configured_mean_dtype_reaches_the_shared_populations_candidates() -> None:
    """A shared-population run's ``mean_dtype`` is the dtype its sites receive the candidates in.
    Break seen to fail (mutmut, session 10): ``SharedPopulationES.from_config`` passing None for it
    (the candidates then go out in float64)."""
    config = RunConfig(
        projection=ProjectionSpec(intrinsic_dim=DIM),
        rounds=20,
        aggregator="shared_es",
        local_popsize=4,
        mean_dtype="float32",
    )
    agg = SharedPopulationES.from_config(config)
    sent = agg.payload(agg.initial_state())
    assert sent.candidates is not None
    assert (sent.mean.dtype, sent.candidates.dtype, sent.candidates.shape) == ("float32", "float32", [4, DIM])


def test_the_server_es_built_by_hand_defaults_to_what_a_run_config_defaults_to() -> None:
    """Every keyword ``ServerCMAES`` shares with ``RunConfig`` defaults to the config's default but
    the documented one (``server_weights``: "rank", the reference's, where a config says "samples").
    Breaks seen to fail: the constructor's ``covariance_rank`` default 9, ``server_sigma``'s
    misspelt."""
    by_hand = ServerCMAES(dim=DIM, sigma0=1.0, rounds=20, local_popsize=6)
    defaults = RunConfig(projection=ProjectionSpec(intrinsic_dim=DIM))
    shared = ["server_sigma", "sigma_floor", "sigma_ceiling", "covariance", "covariance_rank"]
    shared += ["covariance_dtype", "mean_dtype"]
    assert {k: getattr(by_hand, k) for k in shared} == {k: getattr(defaults, k) for k in shared}
    assert (by_hand.server_weights, defaults.server_weights) == ("rank", "samples")


def test_clipping_keeps_a_candidate_scoring_sites_losses() -> None:
    """The robust screen pulls a far mean back to its radius and keeps everything else the site
    reported, its per-candidate losses included (a shared-population site's whole update). Breaks
    seen to fail: the clipped contribution rebuilt without its losses (None, or the field left
    out)."""
    config = RunConfig(projection=ProjectionSpec(intrinsic_dim=DIM), robust="clip", robust_multiple=1.0)
    state = ServerCMAES(dim=DIM, sigma0=1.0, rounds=20, local_popsize=6).initial_state()
    far = Contribution("far", np.full(DIM, 10.0), 0.5, (0.9,), 2, 8, (0.7, 0.6, 0.5))
    usable, clipped, rejected = screen(config, state, [far])
    assert (clipped, rejected) == (["far"], [])
    assert usable[0].losses == (0.7, 0.6, 0.5)
    assert math.isclose(float(np.linalg.norm(usable[0].mean - state.mean)), math.sqrt(DIM), rel_tol=1e-12)


def test_pending_decomposition_is_exactly_when_pycmas_next_ask_decomposes() -> None:
    """The matrix precomputed while clients train is C when, and only when, the next server step
    for that many answers re-decomposes C (pycma's lazy gap: the count of eigendecompositions in
    the state after the step goes up); one or two answers both run pycma for two."""
    agg = ServerCMAES(dim=DIM, sigma0=1.0, rounds=50, local_popsize=6)
    state = agg.initial_state()
    rng = np.random.default_rng(0)
    seen = set()
    for r in range(16):
        m = [1, 2, 3, 5, 1, 1, 2, 4][r % 8]
        pending = agg.pending_decomposition(state, m)
        cs = [
            _contribution(k, state.mean + state.sigma * rng.normal(size=DIM), fitness=float(rng.uniform()))
            for k in range(m)
        ]
        after = agg.aggregate(state, cs).state
        assert state.es is not None and after.es is not None
        decomposed = after.es.count_eigen > state.es.count_eigen
        assert (pending is not None) == decomposed, (r, m)
        if pending is not None:
            np.testing.assert_array_equal(pending, state.es.C)
        seen.add(decomposed)
        state = after
    assert seen == {True, False}
    assert agg.pending_decomposition(ServerState(mean=np.zeros(DIM), sigma=1.0, es=None), 3) is None


def test_reference_sigma_with_different_local_populations() -> None:
    """sqrt(sum_k sum_j sigma_kj^2 / mu_k / M): each client's sum divided by its own mu."""
    mean = np.zeros(DIM)
    cs = [_contribution(0, mean, sigmas=(1.0, 2.0), mu=2), _contribution(1, mean, sigmas=(3.0,), mu=4)]
    expected = math.sqrt(((1 + 4) / 2 + 9 / 4) / 2)
    assert reference_server_sigma(cs) == pytest.approx(expected, rel=1e-12)
    same = [_contribution(0, mean, sigmas=(1.0, 2.0), mu=2), _contribution(1, mean, sigmas=(3.0,), mu=2)]
    assert reference_server_sigma(same) == pytest.approx(math.sqrt((5 + 9) / 2 / 2), rel=1e-12)


def test_paper_sigma_of_two_clients_uses_the_better_one() -> None:
    """Eq. 6: 2 * sqrt(sum over the best ceil(M/2) clients of sum_j sigma_kj^2 / (M * lambda)); with
    M = 2 that is the one client of lower fitness."""
    mean = np.zeros(DIM)
    cs = [
        _contribution(0, mean, fitness=0.9, sigmas=(3.0,)),
        _contribution(1, mean, fitness=0.1, sigmas=(1.0, 2.0)),
    ]
    assert paper_server_sigma(cs, local_popsize=6) == pytest.approx(2 * math.sqrt(5 / (2 * 6)), rel=1e-12)
    assert paper_server_sigma(cs[:1], local_popsize=6) == pytest.approx(2 * math.sqrt(9 / 6), rel=1e-12)


def test_a_round_without_contributions_carries_an_independent_copy() -> None:
    """The carried-over state shares no array with the one before it: the next round writes its own
    state without touching the stored one."""
    config = RunConfig(projection=ProjectionSpec(intrinsic_dim=DIM), rounds=20)
    agg = ServerCMAES(dim=DIM, sigma0=1.0, rounds=20, local_popsize=6)
    state = _later_state(agg)
    assert state.es is not None
    before = {name: array.copy() for name, array in state.es.arrays().items()}
    outcome = server_step(agg, config, state, [])
    carried = outcome.state
    assert carried.es is not None and carried.sigma == state.sigma
    np.testing.assert_array_equal(carried.mean, state.mean)
    for name, array in carried.es.arrays().items():
        np.testing.assert_array_equal(array, before[name])
        array[...] = 0.0
    carried.mean[...] = 0.0
    for name, array in state.es.arrays().items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)
    assert outcome.used == [] and outcome.rejected == []


# check_state: the gate between a server step and the store.


def _with_es(state: ServerState, **arrays: np.ndarray) -> ServerState:
    assert state.es is not None
    return replace(state, es=replace(state.es, **arrays))


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.inf, math.nan])
def test_a_sigma_that_is_not_finite_and_positive_is_refused(sigma: float) -> None:
    state = ServerState(mean=np.zeros(DIM), sigma=sigma, es=None)
    with pytest.raises(AggregationError) as refused:
        check_state(state, DIM)
    assert str(refused.value) == f"the new sigma is {sigma}; it must be finite and > 0"
    check_state(replace(state, sigma=1e-300), DIM)


@pytest.mark.parametrize("name", ["pc", "ps", "C", "D"])
def test_non_finite_es_bookkeeping_is_refused_by_name(name: str) -> None:
    state = _later_state(ServerCMAES(dim=DIM, sigma0=1.0, rounds=20, local_popsize=6))
    assert state.es is not None
    broken = getattr(state.es, name).copy()
    broken.flat[0] = np.inf
    with pytest.raises(AggregationError, match=rf"^the new ES state's {name} has non-finite entries$"):
        check_state(_with_es(state, **{name: broken}), DIM)


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e6])
def test_symmetry_is_judged_relative_to_the_covariances_scale(scale: float) -> None:
    """Rounding-level asymmetry (1e-13 of the diagonal) passes at any scale; an asymmetry of 1e-7 of
    the diagonal does not, however small or large C is."""
    state = _later_state(ServerCMAES(dim=DIM, sigma0=1.0, rounds=20, local_popsize=6))
    assert state.es is not None
    c = (state.es.C + state.es.C.T) / 2 * scale
    diagonal = float(np.max(np.diag(c)))

    def skewed(by: float) -> np.ndarray:
        out = c.copy()
        out[0, 1] += by * diagonal
        return out

    check_state(_with_es(state, C=skewed(1e-13)), DIM)
    with pytest.raises(AggregationError, match=r"^the new covariance is not symmetric$"):
        check_state(_with_es(state, C=skewed(1e-7)), DIM)
    # Relative to the entry itself: its largest off-diagonal entry 1e-7 larger than its mirror.
    i, j = np.unravel_index(np.argmax(np.abs(c - np.diag(np.diag(c)))), c.shape)
    relative = c.copy()
    relative[i, j] *= 1 + 1e-7
    with pytest.raises(AggregationError, match=r"^the new covariance is not symmetric$"):
        check_state(_with_es(state, C=relative), DIM)


def test_a_symmetric_covariance_that_is_not_positive_definite_is_refused() -> None:
    state = _later_state(ServerCMAES(dim=DIM, sigma0=1.0, rounds=20, local_popsize=6))
    assert state.es is not None
    indefinite = state.es.C.copy()
    indefinite[0, 0] = -indefinite[0, 0]
    with pytest.raises(AggregationError, match=r"^the new covariance is not positive-definite$"):
        check_state(_with_es(state, C=indefinite), DIM)


# The robust screen (RunConfig.robust): radius robust_multiple * sigma * sqrt(d) around the mean.


def _robust_config(mode: str) -> RunConfig:
    return RunConfig(projection=ProjectionSpec(intrinsic_dim=4), robust=mode, robust_multiple=3.0)


ROBUST_STATE = ServerState(mean=np.array([1.0, -1.0, 0.5, 0.0]), sigma=2.0, es=None)  # radius 3 * 2 * 2 = 12


def _at(offset: list[float], k: int = 0) -> Contribution:
    return Contribution(f"site-{k}", ROBUST_STATE.mean + np.array(offset), 0.5, (1.0,), 3, 10)


@pytest.mark.parametrize("mode", ["clip", "reject"])
def test_the_screen_keeps_what_lies_within_the_radius_edge_included(mode: str) -> None:
    inside = [_at([11.0, 0.0, 0.0, 0.0], 0), _at([0.0, 0.0, -12.0, 0.0], 1), _at([6.0, 6.0, 6.0, 6.0], 2)]
    usable, clipped, rejected = screen(_robust_config(mode), ROBUST_STATE, inside)
    assert (usable, clipped, rejected) == (inside, [], [])


def test_clipping_pulls_a_far_mean_back_to_the_radius_along_its_direction() -> None:
    far = _at([30.0, 0.0, -40.0, 0.0], 7)  # distance 50
    usable, clipped, rejected = screen(_robust_config("clip"), ROBUST_STATE, [far])
    assert clipped == ["site-7"] and rejected == []
    np.testing.assert_allclose(
        usable[0].mean, ROBUST_STATE.mean + np.array([7.2, 0.0, -9.6, 0.0]), rtol=1e-12
    )
    assert (usable[0].client_id, usable[0].fitness, usable[0].sigmas) == ("site-7", 0.5, (1.0,))


def test_rejecting_leaves_a_far_mean_out() -> None:
    near, far = _at([1.0, 0.0, 0.0, 0.0], 0), _at([0.0, 13.0, 0.0, 0.0], 1)
    assert screen(_robust_config("reject"), ROBUST_STATE, [near, far]) == ([near], [], ["site-1"])
    assert screen(_robust_config("off"), ROBUST_STATE, [near, far]) == ([near, far], [], [])


# server_step's retries, with an aggregator of the test's own (the protocol is plain computation).


class _Picky:
    """Averages the means; fails on any site named "bad..." and, if ``needs_two``, on one site alone."""

    name = "picky"

    def __init__(self, needs_two: bool = False) -> None:
        self.needs_two = needs_two

    def aggregate(self, state: ServerState, contributions: list[Contribution]) -> Step:
        if any(c.client_id.startswith("bad") for c in contributions):
            raise ZeroDivisionError("a bad site")
        if self.needs_two and len(contributions) < 2:
            raise RuntimeError("needs two")
        return Step(
            ServerState(mean=np.mean([c.mean for c in contributions], axis=0), sigma=state.sigma, es=None)
        )


def _site(name: str, value: float) -> Contribution:
    return Contribution(name, np.full(4, value), 0.5, (1.0,), 3, 10)


PLAIN = RunConfig(projection=ProjectionSpec(intrinsic_dim=4))
PLAIN_STATE = ServerState(mean=np.zeros(4), sigma=1.0, es=None)


def test_one_offender_is_left_out_even_when_no_site_works_alone() -> None:
    """Leave-one-out finds the offender although every site fails on its own (the aggregator needs
    two), so the honest pair's step is kept."""
    outcome = server_step(
        _Picky(needs_two=True), PLAIN, PLAIN_STATE, [_site("a", 1.0), _site("b", 3.0), _site("bad", 9.0)]
    )
    assert (outcome.used, outcome.rejected) == (["a", "b"], ["bad"])
    np.testing.assert_array_equal(outcome.state.mean, np.full(4, 2.0))


def test_several_offenders_leave_the_sites_that_work_alone() -> None:
    outcome = server_step(
        _Picky(), PLAIN, PLAIN_STATE, [_site("a", 1.0), _site("bad-1", 5.0), _site("bad-2", 7.0)]
    )
    assert (outcome.used, outcome.rejected) == (["a"], ["bad-1", "bad-2"])
    np.testing.assert_array_equal(outcome.state.mean, np.full(4, 1.0))


def test_a_step_that_fails_for_everyone_says_why() -> None:
    """Every site fails with every other and alone: the run is refused with the step's own error."""
    expected = r"^the server step failed \(ZeroDivisionError: a bad site\) and no contribution explains it$"
    with pytest.raises(AggregationError, match=expected):
        server_step(_Picky(), PLAIN, PLAIN_STATE, [_site("bad-1", 1.0), _site("bad-2", 2.0)])


def test_the_recorded_duration_lies_within_the_call() -> None:
    before = time.perf_counter()
    outcome = server_step(_Picky(), PLAIN, PLAIN_STATE, [_site("a", 1.0), _site("b", 2.0)])
    elapsed = time.perf_counter() - before
    assert isinstance(outcome.seconds, float) and 0.0 <= outcome.seconds <= elapsed


def test_an_unknown_aggregator_name_is_refused_with_the_known_ones() -> None:
    """A config written by another version (the registry, not the schema, is the last word)."""
    config = PLAIN.model_copy(update={"aggregator": "sgd"})
    with pytest.raises(
        ValueError, match=r"^no aggregator named 'sgd'; known: \['cmaes', 'fedavg', 'shared_es'\]$"
    ):
        make_aggregator(config)
