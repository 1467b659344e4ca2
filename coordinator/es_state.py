"""The server's CMA-ES state, taken out of a pycma ``CMAEvolutionStrategy`` and put back exactly.

Between rounds the coordinator keeps no live pycma object: after every aggregation it captures the
state variables that pycma's ``ask``/``tell`` read (mean, sigma, iteration counters, the evolution
paths pc, pc2 and ps, the covariance C with its eigen-decomposition B, D and the lazy-update
bookkeeping of the sampler) as typed numpy arrays and numbers, stores them in SQLite (never pickled)
and, at the next round, builds a fresh ES for the M clients that answered and writes the state back.
A restored ES then takes exactly the step that one which never stopped would have taken (tested
bit for bit against a persistent pycma ES).

Everything else pycma keeps either only steers its own sampling (whose samples the server throws
away), stopping criteria or logging, or is a parameter derived from the dimension and the
population size (recomputed for each round's M).

Options, checked on pycma 4.5.0 against the reference's 3.4.0 (docs/coordinator.md):
- ``AdaptSigma`` is pinned to CSA. pycma >= 4 switches its default to TPA for dimensions >= 300,
  which would change the server's step size at d = 500; 3.4.0 used CSA there.
- ``seed`` is NaN and ``randn`` a private generator: pycma otherwise re-seeds numpy's *global*
  RNG each time an ES is built. The samples of the one ``ask`` per round are discarded, so they
  never reach the state.
- ``CMA_eigenmethod`` is :data:`EIGEN_CACHE`: numpy's ``eigh`` behind a cache that the coordinator
  fills in the background while clients train, so the decomposition pycma's next ``ask`` makes
  is usually ready (same function, same input, same result).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

# pycma warns about things that are expected here (telling solutions it did not sample, small
# populations, orphaned mirror samples from the discarded ask). They say nothing about our state.
warnings.filterwarnings("ignore", module=r"cma(\.|$)")

# The pycma releases capture/restore was verified on (bit for bit against a persistent ES, in
# tests/coordinator/test_aggregation.py). Another release may rename or re-derive what they write.
VERIFIED_PYCMA = frozenset({"4.5.0"})
UNVERIFIED_PYCMA_ENV = "FEDBPT_ALLOW_UNVERIFIED_PYCMA"


def check_pycma() -> None:
    """Refuse to start on a pycma release the state capture was not verified on (it writes pycma's
    internal attributes); ``FEDBPT_ALLOW_UNVERIFIED_PYCMA=1`` starts anyway, at the user's risk."""
    import cma

    if cma.__version__ in VERIFIED_PYCMA or os.environ.get(UNVERIFIED_PYCMA_ENV) == "1":
        return
    raise RuntimeError(
        f"pycma {cma.__version__} is installed; the coordinator's CMA-ES state capture was verified on "
        f"pycma {', '.join(sorted(VERIFIED_PYCMA))} only. Install that (pip install cma=={min(VERIFIED_PYCMA)}), "
        f"or set {UNVERIFIED_PYCMA_ENV}=1 after running tests/coordinator/test_aggregation.py on the new release."
    )


_SAMPLES = np.random.default_rng(0x5EED)
_SAMPLES_LOCK = threading.Lock()


def _discarded_randn(*shape: int) -> np.ndarray:
    """Standard normal numbers for pycma's ``ask``, whose samples the server never uses."""
    with _SAMPLES_LOCK:
        return _SAMPLES.standard_normal(shape)


class EigenCache:
    """``eigh`` with a cache of precomputed decompositions (pycma's ``CMA_eigenmethod`` hook).

    pycma decomposes C lazily inside ``ask`` (every round for large populations at d = 500). The
    coordinator knows C as soon as a round closes, so it computes the decomposition pycma will ask
    for in the background; at aggregation time a lookup with ``np.array_equal`` on the input
    replaces the O(d^3) call. A miss falls back to ``np.linalg.eigh`` — same function, same input.
    """

    def __init__(self, max_entries: int = 8) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def __call__(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            entries = list(self._entries.values())
        for source, values, vectors in entries:
            if source.shape == matrix.shape and np.array_equal(source, matrix):
                self.hits += 1
                return values.copy(order="K"), vectors.copy(order="K")
        self.misses += 1
        values, vectors = np.linalg.eigh(matrix)
        return values, vectors

    def precompute(self, key: str, covariance: np.ndarray) -> None:
        """Decompose C the way pycma's ``GaussFullSampler._decompose_C`` will: symmetrised first."""
        symmetric = (covariance + covariance.T) / 2
        values, vectors = np.linalg.eigh(symmetric)
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (symmetric, values, vectors)
            while len(self._entries) > self.max_entries:
                self._entries.pop(next(iter(self._entries)))

    def forget(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)


EIGEN_CACHE = EigenCache()


def es_options(
    popsize: int,
    maxiter: int,
    eigenmethod: Callable[..., Any] | None = None,
    weights: Sequence[float] | None = None,
    *,
    randn: Callable[..., np.ndarray] | None = None,
    all_parents: bool = True,
) -> dict[str, Any]:
    """The server ES's pycma options: the reference's (popsize = CMA_mu = M, maxiter = rounds),
    with CSA pinned and no global RNG side effects (module docstring). ``weights``: the M
    recombination weights by rank, non-increasing (pycma's ``CMA_recombination_weights``, which
    normalises them), instead of pycma's own rank weights.

    ``randn`` (a private generator's standard normals) replaces the discarded one where the
    samples are used (``shared_es``); ``all_parents=False`` keeps pycma's own parent number and
    weights, and turns mirrored sampling off: its selective mirrors read the previous generation's
    ranking, which is not part of the captured state."""
    import cma

    options: dict[str, Any] = {
        "popsize": popsize,
        "maxiter": maxiter,
        "verbose": -9,
        "seed": float("nan"),
        "randn": randn or _discarded_randn,
        "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA,
        "CMA_eigenmethod": eigenmethod or EIGEN_CACHE,
    }
    if all_parents:
        options["CMA_mu"] = popsize
    else:
        options["CMA_mirrors"] = 0
    if weights is not None:
        # pycma wants a last weight <= 0: one more, zero-weighted, slot that no solution fills.
        options["CMA_recombination_weights"] = [float(w) for w in weights] + [0.0]
    return options


@dataclass
class ESCore:
    """pycma state beyond the mean and sigma (see the module docstring for why these)."""

    countiter: int
    countevals: int
    pc: np.ndarray
    pc2: np.ndarray
    ps: np.ndarray
    csa_delta: float
    C: np.ndarray
    B: np.ndarray
    D: np.ndarray
    count_tell: int
    last_update: int
    count_eigen: int

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)
        }

    def numbers(self) -> dict[str, int | float]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if not isinstance(getattr(self, f.name), np.ndarray)
        }


@dataclass
class ServerState:
    """The global state between rounds: N(mean, sigma^2 C) for the clients, plus pycma's
    bookkeeping (``es``; None for fedavg, whose C is I)."""

    mean: np.ndarray
    sigma: float
    es: ESCore | None

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def covariance(self) -> np.ndarray | None:
        return None if self.es is None else self.es.C


def initial_es(dim: int, sigma0: float, popsize: int, maxiter: int) -> ServerState:
    """The reference's server ES at round 0: mean 0, sigma0, pycma's initial C."""
    import cma

    es = cma.CMAEvolutionStrategy(np.zeros(dim), sigma0, es_options(max(popsize, 2), maxiter))
    return capture(es)


def capture(es: Any) -> ServerState:
    """Copy the state out of a pycma ES (arrays keep their memory layout: pycma's B is
    Fortran-ordered, and matrix products in another layout round differently)."""
    sm = es.sm
    core = ESCore(
        countiter=int(es.countiter),
        countevals=int(es.countevals),
        pc=np.array(es.pc, dtype=np.float64, order="K"),
        pc2=np.array(es.pc2, dtype=np.float64, order="K"),
        ps=np.array(es.adapt_sigma.ps, dtype=np.float64, order="K"),
        csa_delta=float(es.adapt_sigma.delta),
        C=np.array(sm.C, dtype=np.float64, order="K"),
        B=np.array(sm.B, dtype=np.float64, order="K"),
        D=np.array(sm.D, dtype=np.float64, order="K"),
        count_tell=int(sm.count_tell),
        last_update=int(sm.last_update),
        count_eigen=int(sm.count_eigen),
    )
    return ServerState(mean=np.array(es.mean, dtype=np.float64), sigma=float(es.sigma), es=core)


def restore(
    state: ServerState,
    popsize: int,
    maxiter: int,
    sigma0: float,
    eigenmethod: Callable[..., Any] | None = None,
    weights: Sequence[float] | None = None,
    *,
    randn: Callable[..., np.ndarray] | None = None,
    all_parents: bool = True,
) -> Any:
    """A pycma ES for ``popsize`` clients (or candidates) carrying ``state`` exactly.

    The strategy parameters (weights, learning rates, CSA constants, the lazy-update gap) are
    pycma's own for this population size; only state variables are written back. ``randn`` and
    ``all_parents``: as in :func:`es_options`.
    """
    import cma

    if state.es is None:
        raise ValueError("a fedavg state has no CMA-ES to restore")
    core = state.es
    options = es_options(popsize, maxiter, eigenmethod, weights, randn=randn, all_parents=all_parents)
    es = cma.CMAEvolutionStrategy(state.mean.copy(), sigma0, options)
    es.sigma = state.sigma
    es.countiter = core.countiter
    es.countevals = core.countevals
    es.pc = core.pc.copy(order="K")
    es.pc2 = core.pc2.copy(order="K")
    es.adapt_sigma.ps = core.ps.copy(order="K")
    es.adapt_sigma.delta = core.csa_delta
    sm = es.sm
    sm.C = core.C.copy(order="K")
    sm.B = core.B.copy(order="K")
    sm.D = core.D.copy(order="K")
    sm.count_tell = core.count_tell
    sm.last_update = core.last_update
    sm.count_eigen = core.count_eigen
    sm._inverse_root_C = None
    es._updateBDfromSM(sm)
    if es.countiter > 0:
        # pycma creates its timer in the first ask (countiter == 0) and only ticks it later, and
        # from the second tell on it moves mean_old to mean_old_old before setting mean_old to
        # the mean; neither value reaches the update.
        es.timer = cma.utilities.utils.ElapsedWCTime()
        es.mean_old = es.mean.copy()
    return es


def decomposition_due(state: ServerState, popsize: int, maxiter: int) -> bool:
    """Whether pycma's next ``ask`` for ``popsize`` clients will re-decompose C (its lazy gap)."""
    if state.es is None:
        return False
    gap = _lazy_gap(state.dim, popsize, maxiter)
    core = state.es
    return not (core.count_tell < core.last_update + gap or gap == core.count_tell - core.last_update == 0)


_GAPS: dict[tuple[int, int, int], float] = {}


def _lazy_gap(dim: int, popsize: int, maxiter: int) -> float:
    key = (dim, popsize, maxiter)
    if key not in _GAPS:
        import cma

        es = cma.CMAEvolutionStrategy(np.zeros(dim), 1.0, es_options(popsize, maxiter))
        _GAPS[key] = float(es.sm.lazy_update_gap)
    return _GAPS[key]
