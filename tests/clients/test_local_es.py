"""The rebuilt local ES equals pycma's ``_copy_light`` of the server ES (identical samples)."""

from __future__ import annotations

import cma
import numpy as np
import pytest

from fed_clients.local_es import build_local_es, covariance, local_mu, pycma_seed
from protos import Array, GlobalState
from protos.covariance import LowRankCovariance

D = 30
SEED = 1234
CSA = cma.sigma_adaptation.CMAAdaptSigmaCSA


def _server_es(rounds: int = 3, d: int = D) -> cma.CMAEvolutionStrategy:
    """A server ES as the reference builds it (pycma 3.4.0 adapts sigma with CSA at any d; pycma 4
    needs it pinned), after a few tells so that C is no longer I."""
    options = {"seed": SEED, "popsize": 10, "CMA_mu": 10, "maxiter": 200, "verbose": -9, "AdaptSigma": CSA}
    es = cma.CMAEvolutionStrategy(np.zeros(d), 1.0, options)
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        es.ask()
        x = [es.mean + rng.normal(size=d) * (1 + np.arange(d) / 5) for _ in range(10)]
        es.tell(x, [float(np.sum(v**2 * (1 + np.arange(d)))) for v in x])
    return es


def _trajectory(es: cma.CMAEvolutionStrategy, generations: int = 4) -> list[np.ndarray]:
    """Samples of a few generations on a fixed objective (the rebuilt ES must follow the same path)."""
    out = []
    for _ in range(generations):
        x = es.ask()
        out.append(np.array(x))
        es.tell(x, [float(np.sum(np.asarray(v) ** 2)) for v in x])
    return out


def _state(es: cma.CMAEvolutionStrategy, cov: np.ndarray | None, dtype: str = "float64") -> GlobalState:
    return GlobalState(
        mean=Array.from_numpy(es.mean, dtype="float64"),
        sigma=float(es.sigma),
        cov=None if cov is None else Array.from_numpy(cov, dtype=dtype),  # type: ignore[arg-type]
    )


def _copy_light(es: cma.CMAEvolutionStrategy, popsize: int = 5, iters: int = 8) -> cma.CMAEvolutionStrategy:
    return es._copy_light(inopts={"seed": SEED, "popsize": popsize, "maxiter": iters, "CMA_mu": None})


@pytest.mark.parametrize("d", [D, 500])
def test_full_covariance_gives_the_same_samples_as_copy_light(d: int) -> None:
    server = _server_es(d=d)
    assert np.abs(server.sm.C - np.eye(d)).max() > 1e-5  # C really moved
    ours = _trajectory(build_local_es(_state(server, server.sm.C), 5, 8, SEED))
    theirs = _trajectory(_copy_light(server))
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("popsize", [5, 20])
def test_same_sigma_mean_and_parents_as_copy_light(popsize: int) -> None:
    server = _server_es()
    ours = build_local_es(_state(server, server.sm.C), popsize, 8, SEED)
    theirs = _copy_light(server, popsize)
    assert ours.sigma == theirs.sigma
    assert np.array_equal(ours.mean, theirs.mean)
    assert ours.sp.weights.mu == theirs.sp.weights.mu == local_mu(popsize) == popsize // 2
    assert ours.popsize == popsize and ours.countiter == 0
    assert isinstance(ours.adapt_sigma, CSA) and isinstance(theirs.adapt_sigma, CSA)
    assert not np.asarray(ours.adapt_sigma.ps).any()
    assert not np.asarray(ours.pc).any()  # fresh evolution paths


def test_identity_when_no_covariance_is_sent() -> None:
    server = cma.CMAEvolutionStrategy(
        np.full(D, 0.3), 0.7, {"seed": SEED, "popsize": 10, "CMA_mu": 10, "verbose": -9, "AdaptSigma": CSA}
    )
    ours = _trajectory(build_local_es(_state(server, None), 5, 8, SEED))
    theirs = _trajectory(_copy_light(server))
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(a, b)


def test_diagonal_covariance_equals_the_full_diagonal_matrix() -> None:
    server = _server_es()
    diag = np.diag(server.sm.C).copy()
    a = _trajectory(build_local_es(_state(server, diag), 5, 8, SEED))
    b = _trajectory(build_local_es(_state(server, np.diag(diag)), 5, 8, SEED))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_low_rank_covariance_samples_as_the_matrix_it_stands_for() -> None:
    server = _server_es()
    form = LowRankCovariance.of(server.sm.C, 4)
    state = _state(server, None).model_copy(update={"cov_lowrank": form})
    a = _trajectory(build_local_es(state, 5, 8, SEED))
    b = _trajectory(build_local_es(_state(server, form.dense()), 5, 8, SEED))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    wrong = LowRankCovariance.of(np.eye(D + 1), 2)
    with pytest.raises(ValueError, match="low-rank covariance of dimension"):
        covariance(state.model_copy(update={"cov_lowrank": wrong}))


def test_float32_covariance_on_the_wire_stays_close() -> None:
    server = _server_es()
    ours = _trajectory(build_local_es(_state(server, server.sm.C, "float32"), 5, 8, SEED), 1)
    theirs = _trajectory(_copy_light(server), 1)
    assert np.allclose(ours[0], theirs[0], atol=1e-3)  # float32 C: eigenvectors move by ~1e-5


def test_covariance_shape_is_checked() -> None:
    server = _server_es(0)
    with pytest.raises(ValueError, match="does not fit"):
        covariance(_state(server, np.eye(D + 1)))
    with pytest.raises(ValueError, match="positive"):
        covariance(_state(server, -np.ones(D)))


def test_pycma_seed_never_lets_pycma_pick_a_clock_seed() -> None:
    assert pycma_seed(1234) == 1234
    assert pycma_seed(0) != 0
    assert 0 < pycma_seed(2**40 + 7) < 2**32
    # Seed 0 must still be deterministic.
    a = _trajectory(build_local_es(_state(_server_es(0), None), 5, 8, 0), 1)
    b = _trajectory(build_local_es(_state(_server_es(0), None), 5, 8, 0), 1)
    assert np.array_equal(a[0], b[0])
