"""Server aggregation: a hand-computed round, parity with pycma driven the way the reference drives
it, restore-equals-continue, missing clients, the paper's sigma', fedavg and the robust option."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import cma
import numpy as np
import pytest

from coordinator.aggregators import Contribution, aggregate
from coordinator.aggregators.cmaes import paper_server_sigma, reference_server_sigma
from coordinator.es_state import EigenCache, ServerState, initial_es, restore
from coordinator.store import Store
from protos import RunConfig

warnings.filterwarnings("ignore", module=r"cma(\.|$)")
# The reference's persistent ES (M < 6: mirrored sampling) leaves its mirror samples untold and
# pycma says so; that is the reference's behaviour, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:orphanated injected solution")


def config(dim: int, **overrides: object) -> RunConfig:
    """The reference's server step (rank weights) unless overridden: these tests check parity with it."""
    return RunConfig.model_validate(
        {"projection": {"intrinsic_dim": dim}, "server_weights": "rank", **overrides}
    )


def contributions(
    state: ServerState,
    rng: np.random.Generator,
    m: int,
    iters: int = 8,
    spread: tuple[float, float] = (0.2, 2.5),
) -> list[Contribution]:
    """M synthetic client results around the global mean (some long enough for pycma to clip)."""
    d = state.dim
    out = []
    for k in range(m):
        step = state.sigma * rng.normal(size=d) * rng.uniform(*spread)
        sigmas = tuple(float(s) for s in state.sigma * rng.uniform(0.8, 1.0, size=iters))
        out.append(
            Contribution(f"c{k:02d}", state.mean + step, float(rng.uniform(0.5, 1.5)), sigmas, 2, 10 + k)
        )
    return out


def reference_es(dim: int, m: int, rounds: int) -> cma.CMAEvolutionStrategy:
    """The reference's server ES (NVFlare ``global_es.py``), with CSA pinned (see the next test)."""
    opts = {
        "seed": 1234,
        "popsize": m,
        "maxiter": rounds,
        "verbose": -1,
        "CMA_mu": m,
        "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA,
    }
    return cma.CMAEvolutionStrategy(dim * [0], 1.0, inopts=opts)


def reference_round(es: cma.CMAEvolutionStrategy, local_sigma: float, results: list[Contribution]) -> float:
    """One round of the reference's server loop, operation for operation; returns the new client sigma."""
    m = len(results)
    solutions = np.concatenate([[c.mean] for c in results], axis=0)
    fitnesses = np.concatenate([[c.fitness] for c in results])
    client_sigma_list = [np.sum(np.array(c.sigmas) ** 2) for c in results]
    global_sigma = np.sqrt(np.sum(np.array(client_sigma_list)) / m / results[-1].mu)
    es.sigma = global_sigma
    old = es.sigma
    es.ask()
    es.tell(solutions, fitnesses)
    es.sigma = es.sigma / old * local_sigma
    return float(es.sigma)


def test_pycma_450_defaults_to_tpa_at_d500_so_the_server_pins_csa() -> None:
    """The reference ran pycma 3.4.0, whose default step-size control here is CSA; 4.x switched to
    TPA for dimension >= 300. Without pinning CSA the server's sigma would follow another rule."""
    default = cma.CMAEvolutionStrategy(np.zeros(500), 1.0, {"verbose": -9, "popsize": 10, "CMA_mu": 10})
    assert type(default.adapt_sigma).__name__ == "CMAAdaptSigmaTPA"
    state = initial_es(500, 1.0, 10, 200)
    es = restore(state, 10, 200, 1.0)
    assert type(es.adapt_sigma).__name__ == "CMAAdaptSigmaCSA"
    # The reference's numbers for M = 10, d = 500 (fedbpt-spec §4.2): weights and CSA constants.
    assert es.sp.weights.positive_weights[0] == pytest.approx(0.2796, abs=1e-4)
    assert es.sp.weights.positive_weights[-1] == pytest.approx(0.0058, abs=1e-4)
    assert es.adapt_sigma.cs == pytest.approx(0.01560, abs=1e-5)
    assert es.adapt_sigma.damps == pytest.approx(1.01560, abs=1e-5)


def test_hand_computed_round() -> None:
    """Three clients at d = 5: rank weights, pycma's injection clipping, sigma', CSA, the new C and
    the clients' next sigma, all computed here from the formulas (numpy only)."""
    d, m = 5, 3
    cfg = config(d, local_iters=2, rounds=10)
    state = initial_es(d, 1.0, m, cfg.rounds)
    assert state.es is not None
    c0 = np.diag(state.es.C).copy()
    np.testing.assert_array_equal(state.es.C, np.diag(c0))  # pycma starts from a diagonal C
    results = [
        Contribution("a", np.array([0.5, -0.2, 0.1, 0.3, 0.0]), 0.9, (1.0, 0.9), 2, 10),
        Contribution("b", np.array([-0.4, 0.6, 0.2, -0.1, 0.5]), 0.4, (0.95, 0.85), 2, 10),
        Contribution("c", np.array([6.0, 5.0, -7.0, 4.0, 8.0]), 0.7, (1.0, 0.8), 2, 10),  # long: clipped
    ]

    sigma_prime = math.sqrt((1.0**2 + 0.9**2 + 0.95**2 + 0.85**2 + 1.0**2 + 0.8**2) / (m * 2))
    raw = [math.log((2 * m + 1) / 2) - math.log(i) for i in (1, 2, 3)]
    w = np.array(raw) / sum(raw)
    mueff = 1 / float(np.sum(w**2))
    order = ["b", "c", "a"]  # by fitness, ascending
    by_id = {c.client_id: c.mean for c in results}
    upper = math.sqrt(d) + 2 * d / (d + 2)
    ys = []
    for cid in order:
        y = (by_id[cid] - state.mean) / sigma_prime
        length = math.sqrt(float(np.sum(y**2 / c0)))
        ys.append(y / (length / upper) if length > upper else y)
    assert math.sqrt(float(np.sum(ys[1] ** 2 / c0))) == pytest.approx(upper)  # "c" was clipped
    new_mean = state.mean + sigma_prime * sum(wi * yi for wi, yi in zip(w, ys, strict=True))

    cs = (mueff + 2) / (d + mueff + 3)
    damps = 1 + cs  # pycma's damping formula reduces to the textbook 1 + c_sigma at these sizes
    ps = math.sqrt(cs * (2 - cs) * mueff) * ((new_mean - state.mean) / sigma_prime) / np.sqrt(c0)
    chi_n = math.sqrt(2) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    sigma_after_tell = sigma_prime * math.exp(cs / damps * (float(np.linalg.norm(ps)) / chi_n - 1))
    assert float(np.sum(ps**2)) / (1 - (1 - cs) ** 2) / d - 1 < 1 + 4 / (d + 1)  # hsig holds

    cc = (4 + mueff / d) / (d + 4 + 2 * mueff / d)
    pc = math.sqrt(cc * (2 - cc) * mueff) * (new_mean - state.mean) / sigma_prime
    c1 = 2 / ((d + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (0.25 + mueff - 2 + 1 / mueff) / ((d + 2) ** 2 + mueff))
    new_c = (1 - c1 - cmu) * np.diag(c0) + c1 * np.outer(pc, pc)
    new_c = new_c + cmu * sum(wi * np.outer(yi, yi) for wi, yi in zip(w, ys, strict=True))

    out = aggregate(cfg, state, results)
    assert out.server_sigma == pytest.approx(sigma_prime, rel=1e-14)
    np.testing.assert_allclose(out.state.mean, new_mean, rtol=0, atol=1e-13)
    assert out.state.sigma == pytest.approx(sigma_after_tell / sigma_prime * 1.0, rel=1e-12)
    assert out.state.es is not None
    np.testing.assert_allclose(out.state.es.ps, ps, rtol=0, atol=1e-13)
    np.testing.assert_allclose(out.state.es.pc, pc, rtol=0, atol=1e-13)
    np.testing.assert_allclose(out.state.es.C, new_c, rtol=0, atol=1e-14)
    assert out.state.es.countiter == 1
    # Rank weights, not a plain average: the best client moves the mean the most.
    assert w[0] > w[1] > w[2]
    assert not np.allclose(out.state.mean, np.mean([c.mean for c in results], axis=0))


@pytest.mark.parametrize(("d", "m"), [(200, 10), (60, 3)])
def test_matches_a_persistent_pycma_es_driven_like_the_reference(d: int, m: int) -> None:
    """Eight rounds, full participation (pycma re-decomposes C every other round at these sizes, so
    both the lazy path and the decomposition are crossed; M = 3 is in pycma's mirrored-sampling
    regime): every state our restore-ask(1)-tell-capture cycle produces equals the reference loop's
    persistent ES, which asks for M samples, bit for bit."""
    rounds = 8
    cfg = config(d, rounds=200)
    state = initial_es(d, 1.0, m, cfg.rounds)
    es = reference_es(d, m, cfg.rounds)
    local_sigma = float(es.sigma)
    rng = np.random.default_rng(11)
    decompositions = []
    for _ in range(rounds):
        results = contributions(state, rng, m)
        out = aggregate(cfg, state, results, eigenmethod=np.linalg.eigh)
        local_sigma = reference_round(es, local_sigma, results)
        state = out.state
        assert state.es is not None
        assert np.array_equal(state.mean, es.mean)
        assert state.sigma == local_sigma
        assert np.array_equal(state.es.C, es.sm.C)
        assert np.array_equal(state.es.B, es.sm.B) and np.array_equal(state.es.D, es.sm.D)
        assert np.array_equal(state.es.ps, es.adapt_sigma.ps) and np.array_equal(state.es.pc, es.pc)
        assert state.es.countiter == es.countiter and state.es.count_eigen == es.sm.count_eigen
        decompositions.append(es.sm.count_eigen)
    assert 0 < decompositions[-1] < rounds  # lazy rounds and decomposing rounds both happened
    assert np.linalg.norm(state.mean) > 1.0 and state.sigma != 1.0  # the state really moved


def test_restore_from_sqlite_equals_continuing(tmp_path: Path) -> None:
    """A state written to SQLite and read back (the restart path) takes exactly the same next steps
    as the in-memory one, including pycma's Fortran-ordered eigenvectors."""
    d, m = 200, 6
    cfg = config(d, rounds=50)
    store = Store(tmp_path / "s.db")
    with store.transaction():
        store.add_run("r", cfg.model_dump_json(), 0.0)
    memory = initial_es(d, 1.0, m, cfg.rounds)
    rng = np.random.default_rng(5)
    for idx in range(6):
        with store.transaction():
            store.save_state("r", idx, memory, 0.0)
        loaded_idx, stored = store.load_state("r")
        assert loaded_idx == idx
        assert stored.es is not None and memory.es is not None
        assert stored.es.B.flags.f_contiguous == memory.es.B.flags.f_contiguous
        results = contributions(memory, rng, m)
        a = aggregate(cfg, memory, results, eigenmethod=np.linalg.eigh).state
        b = aggregate(cfg, stored, results, eigenmethod=np.linalg.eigh).state
        assert a.es is not None and b.es is not None
        assert np.array_equal(a.mean, b.mean) and a.sigma == b.sigma
        for name, array in a.es.arrays().items():
            assert np.array_equal(array, b.es.arrays()[name]), name
        assert a.es.numbers() == b.es.numbers()
        memory = a
    store.close()


def test_missing_client_aggregates_with_the_m_minus_1_that_answered() -> None:
    """The reference's ES for M = 4 refuses 3 answers; ours rebuilds the ES for the 3 (their
    weights, learning rates and CSA constants), carrying C, the paths and the counters over."""
    d = 50
    cfg = config(d, rounds=20)
    state = initial_es(d, 1.0, 4, cfg.rounds)
    rng = np.random.default_rng(2)
    state = aggregate(cfg, state, contributions(state, rng, 4)).state  # one full round first
    three = contributions(state, rng, 3)

    es4 = restore(state, 4, cfg.rounds, 1.0)
    es4.sigma = reference_server_sigma(three)
    es4.ask()
    with pytest.raises(ValueError, match="not enough solutions"):
        es4.tell([c.mean for c in three], [c.fitness for c in three])

    out = aggregate(cfg, state, three)
    es3 = restore(state, 3, cfg.rounds, 1.0)
    sigma_prime = reference_server_sigma(three)
    es3.sigma = sigma_prime
    es3.ask()
    es3.tell([c.mean.copy() for c in three], [c.fitness for c in three])
    assert out.used == ["c00", "c01", "c02"]
    assert np.array_equal(out.state.mean, es3.mean)
    assert out.state.sigma == float(es3.sigma / sigma_prime * state.sigma)
    assert out.state.es is not None and out.state.es.countiter == 2
    assert np.array_equal(out.state.es.C, es3.sm.C)


def test_single_answer_moves_the_mean_to_it() -> None:
    d = 20
    cfg = config(d)
    state = initial_es(d, 1.0, 2, cfg.rounds)
    one = contributions(state, np.random.default_rng(4), 1, spread=(0.3, 0.3))
    out = aggregate(cfg, state, one)
    np.testing.assert_allclose(out.state.mean, one[0].mean, rtol=0, atol=1e-14)
    assert out.server_sigma == pytest.approx(reference_server_sigma(one))
    assert out.state.es is not None and out.state.es.countiter == 1


def test_paper_sigma_and_sigma_floor() -> None:
    results = [
        Contribution("a", np.zeros(4), 0.9, (1.0, 1.0), 2, 5),
        Contribution("b", np.zeros(4), 0.1, (0.5, 0.5), 2, 5),
        Contribution("c", np.zeros(4), 0.5, (2.0, 2.0), 2, 5),
        Contribution("d", np.zeros(4), 0.3, (1.0, 0.5), 2, 5),
    ]
    # Best half (b, d) over M * lambda = 4 * 5, times 2 (Eq. 6).
    assert paper_server_sigma(results, 5) == pytest.approx(2 * math.sqrt((0.25 + 0.25 + 1.0 + 0.25) / 20))
    assert reference_server_sigma(results) == pytest.approx(math.sqrt((2 + 0.5 + 8 + 1.25) / 4 / 2))
    # The spec's worked example: sigma ~ 1, I = 8, lambda = 5, M = 10 -> 1.789 (paper), 2.0 (reference).
    ten = [Contribution(str(k), np.zeros(2), float(k), (1.0,) * 8, 2, 1) for k in range(10)]
    assert paper_server_sigma(ten, 5) == pytest.approx(1.789, abs=1e-3)
    assert reference_server_sigma(ten) == pytest.approx(2.0)

    d = 30
    state = initial_es(d, 1.0, 3, 10)
    rng = np.random.default_rng(9)
    three = contributions(state, rng, 3, spread=(0.01, 0.02))  # tiny moves: CSA shrinks sigma
    paper = aggregate(config(d, server_sigma="paper"), state, three)
    assert paper.server_sigma == pytest.approx(paper_server_sigma(three, 5))
    free = aggregate(config(d), state, three)
    assert free.state.sigma < 1.0
    floored = aggregate(config(d, sigma_floor=0.999), state, three)
    assert floored.state.sigma == 0.999
    np.testing.assert_array_equal(floored.state.mean, free.state.mean)


def test_equal_and_samples_server_weights_ignore_fitness_from_a_moved_state() -> None:
    """server_weights: equal: the new mean is the plain average of the local means, whatever their
    fitnesses (from a state already away from 0); rank weights favour the best-ranked client."""
    d = 12
    rng = np.random.default_rng(5)
    state = initial_es(d, 1.0, 4, 10)
    state = aggregate(config(d), state, contributions(state, rng, 4, spread=(0.2, 0.4))).state
    assert np.linalg.norm(state.mean) > 0.1
    four = contributions(state, rng, 4, spread=(0.2, 0.4))
    equal = aggregate(config(d, server_weights="equal"), state, four)
    np.testing.assert_allclose(equal.state.mean, np.mean([c.mean for c in four], axis=0), rtol=0, atol=1e-12)
    # The same solutions with their fitnesses reordered move an equal-weights mean nowhere else.
    shuffled = [
        Contribution(c.client_id, c.mean, float(k), c.sigmas, c.mu, c.n_samples) for k, c in enumerate(four)
    ]
    again = aggregate(config(d, server_weights="equal"), state, shuffled[::-1])
    np.testing.assert_allclose(again.state.mean, equal.state.mean, rtol=0, atol=1e-12)
    ranked = aggregate(config(d), state, four)
    best = min(four, key=lambda c: c.fitness)
    assert np.linalg.norm(ranked.state.mean - best.mean) < np.linalg.norm(equal.state.mean - best.mean)
    # samples: the n_samples-weighted average (contributions() gives n = 10, 11, 12, 13), whatever
    # the fitnesses; two clients with the same count weigh the same.
    by_n = aggregate(config(d, server_weights="samples"), state, four)
    n = np.array([c.n_samples for c in four], dtype=np.float64)
    expected = (n / n.sum()) @ np.stack([c.mean for c in four])
    np.testing.assert_allclose(by_n.state.mean, expected, rtol=0, atol=1e-12)
    again = aggregate(config(d, server_weights="samples"), state, shuffled[::-1])
    np.testing.assert_allclose(again.state.mean, expected, rtol=0, atol=1e-12)


def test_sigma_ceiling_caps_the_clients_sigma() -> None:
    d = 30
    state = initial_es(d, 1.0, 3, 10)
    three = contributions(state, np.random.default_rng(2), 3)
    free = aggregate(config(d), state, three)
    capped = aggregate(config(d, sigma_ceiling=free.state.sigma / 2), state, three)
    assert capped.state.sigma == free.state.sigma / 2
    np.testing.assert_array_equal(capped.state.mean, free.state.mean)
    above = aggregate(config(d, sigma_ceiling=free.state.sigma * 2), state, three)
    assert above.state.sigma == free.state.sigma


def test_fedavg_is_the_n_weighted_mean_with_fixed_sigma_and_identity_cov() -> None:
    d = 8
    cfg = config(d, aggregator="fedavg", fedavg_sigma=0.7)
    state = ServerState(mean=np.zeros(d), sigma=0.7, es=None)
    results = [
        Contribution("a", np.full(d, 1.0), 0.2, (0.7,) * 8, 2, 10),
        Contribution("b", np.full(d, 4.0), 0.9, (0.7,) * 8, 2, 30),
    ]
    out = aggregate(cfg, state, results)
    np.testing.assert_allclose(out.state.mean, np.full(d, (10 * 1.0 + 30 * 4.0) / 40))
    assert out.state.sigma == 0.7 and out.state.es is None and out.server_sigma is None
    default = aggregate(config(d, aggregator="fedavg"), state, results)
    assert default.state.sigma == 1.0  # fedavg_sigma unset: projection.sigma0


@pytest.mark.parametrize("offset", [0.0, 3.0], ids=["at-0", "moved"])
@pytest.mark.parametrize(
    ("aggregator", "mode", "multiple"),
    [("cmaes", "reject", 3.0), ("cmaes", "clip", 1.0), ("fedavg", "clip", 3.0), ("fedavg", "reject", 3.0)],
)
def test_robust_option_limits_a_poisoned_update(
    aggregator: str, mode: str, multiple: float, offset: float
) -> None:
    """One hostile site sends a far-away mean with the best fitness. Unguarded, fedavg follows it
    almost all the way and pycma gives it the top rank weight (its own clipping only shortens the
    move to about sigma' * (sqrt(d) + 2), i.e. ~2.1 sigma sqrt(d) with the reference's sigma');
    guarded, the update is pulled back to multiple * sigma * sqrt(d) or left out. ``moved``: from
    a global mean that is not 0 (the radius is around it). Breaks caught (moved): the distance
    measured from 0 instead of from the global mean (the honest sites are then clipped or left out)."""
    d = 40
    if aggregator == "cmaes":
        state = initial_es(d, 1.0, 4, 10)
        state.mean = np.full(d, offset)
    else:
        state = ServerState(mean=np.full(d, offset), sigma=1.0, es=None)
    rng = np.random.default_rng(21)
    honest = contributions(state, rng, 3, spread=(0.2, 0.5))
    poison = Contribution("evil", state.mean + 1e4, -1.0, (1.0,) * 8, 2, 10)
    cfg = config(d, aggregator=aggregator, robust=mode, robust_multiple=multiple)
    out = aggregate(cfg, state, [*honest, poison])
    unguarded = aggregate(config(d, aggregator=aggregator), state, [*honest, poison])
    radius = multiple * state.sigma * math.sqrt(d)
    moved = float(np.linalg.norm(out.state.mean - state.mean))
    if mode == "reject":
        assert out.rejected == ["evil"] and out.clipped == []
        assert out.used == ["c00", "c01", "c02"]
        alone = aggregate(config(d, aggregator=aggregator), state, honest)
        assert np.array_equal(out.state.mean, alone.state.mean)
    else:
        assert out.clipped == ["evil"] and out.rejected == []
        assert "evil" in out.used
        assert moved <= radius  # a weighted mean of moves no longer than the radius
        # The honest sites inside the radius are used as they came (only the poison was pulled).
        unpoisoned = aggregate(cfg, state, honest)
        assert unpoisoned.clipped == [] and unpoisoned.used == ["c00", "c01", "c02"]
    assert float(np.linalg.norm(unguarded.state.mean - state.mean)) > 1.5 * moved


def test_clients_with_different_mu_each_divide_by_their_own() -> None:
    """sigma' = sqrt(sum_k (sum_j sigma_kj^2) / mu_k / M), hand-computed. Breaks caught: one mu
    for all (the first client's, or the mean mu), or M and mu swapped."""
    a = Contribution("a", np.zeros(2), 0.1, (1.0, 2.0), 1, 5)  # 5 / 1
    b = Contribution("b", np.zeros(2), 0.2, (2.0, 2.0), 4, 5)  # 8 / 4
    c = Contribution("c", np.zeros(2), 0.3, (3.0,), 3, 5)  # 9 / 3
    assert reference_server_sigma([a, b, c]) == pytest.approx(math.sqrt((5 + 2 + 3) / 3), rel=1e-15)
    assert reference_server_sigma([b, c]) == pytest.approx(math.sqrt((2 + 3) / 2), rel=1e-15)
    # The same mu everywhere: the reference's expression, sum over M then / mu.
    same = [Contribution(x.client_id, x.mean, x.fitness, x.sigmas, 2, 5) for x in (a, b, c)]
    assert reference_server_sigma(same) == pytest.approx(math.sqrt((5 + 8 + 9) / 3 / 2), rel=1e-15)


def test_no_usable_update_keeps_the_state() -> None:
    d = 10
    state = initial_es(d, 1.0, 2, 10)
    poison = Contribution("evil", np.full(d, 1e3), 0.1, (1.0,) * 8, 2, 10)
    out = aggregate(config(d, robust="reject"), state, [poison])
    assert out.rejected == ["evil"] and out.used == [] and out.server_sigma is None
    assert np.array_equal(out.state.mean, state.mean) and out.state.sigma == state.sigma
    assert out.state.es is not None and state.es is not None
    assert out.state.es.countiter == state.es.countiter


def test_eigen_cache_returns_what_eigh_returns() -> None:
    """The background decomposition is a drop-in: same arrays as numpy's eigh on the same input,
    and the aggregation that uses it equals the one that decomposes itself."""
    d, m = 200, 20
    cfg = config(d, rounds=30)
    state = initial_es(d, 1.0, m, cfg.rounds)
    rng = np.random.default_rng(8)
    state = aggregate(cfg, state, contributions(state, rng, m), eigenmethod=np.linalg.eigh).state
    assert state.es is not None
    cache = EigenCache()
    cache.precompute("run", state.es.C)
    symmetric = (state.es.C + state.es.C.T) / 2
    values, vectors = cache(symmetric)
    expected_values, expected_vectors = np.linalg.eigh(symmetric)
    assert cache.hits == 1
    assert np.array_equal(values, expected_values) and np.array_equal(vectors, expected_vectors)
    results = contributions(state, rng, m)
    cached = aggregate(cfg, state, results, eigenmethod=cache).state
    direct = aggregate(cfg, state, results, eigenmethod=np.linalg.eigh).state
    assert cache.hits == 2  # pycma's ask asked for exactly the precomputed decomposition
    assert cached.es is not None and direct.es is not None
    assert np.array_equal(cached.mean, direct.mean) and np.array_equal(cached.es.B, direct.es.B)
