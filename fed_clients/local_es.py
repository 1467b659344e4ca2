"""The local CMA-ES of one round, rebuilt from the global state.

Same as the reference's ``global_es._copy_light(inopts={seed, popsize, maxiter, CMA_mu: None})``:
a new pycma ES with the global mean and sigma, the global covariance set as its ``C`` (then B and
D recomputed from it), and fresh evolution paths, termination state and iteration counter. pycma
reseeds numpy's global RNG with ``seed`` when it is built, so two ES built from the same state and
seed draw identical samples (tested against ``_copy_light``).
"""

from __future__ import annotations

import warnings

# A site install has no matplotlib (pycma's plots are never used here): silence pycma's notice.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Could not import matplotlib", category=UserWarning)
    import cma
import numpy as np

from protos import GlobalState

# numpy's global seed accepts [0, 2**32 - 1]; pycma treats 0 (and None) as "seed from the clock".
_NUMPY_SEED_SPACE = 2**32 - 1


def pycma_seed(seed: int) -> int:
    """A seed pycma uses as given: in numpy's range, and never 0 (which pycma replaces by a
    clock-based seed). Seeds 1 .. 2**32 - 2 pass unchanged."""
    value = int(seed) % _NUMPY_SEED_SPACE
    return value if value != 0 else _NUMPY_SEED_SPACE


def local_options(popsize: int, maxiter: int, seed: int) -> dict[str, object]:
    """The options of ``_copy_light``'s inopts, plus silence (which does not affect sampling).

    Step-size adaptation is pinned to CSA: the reference's pycma 3.4.0 uses CSA, while pycma >= 4
    switches to TPA for dimensions >= 300 (so at d = 500), which also changes what ``ask`` samples
    (TPA's mirrored first pair). The coordinator pins CSA on the server ES for the same reason.
    """
    return {
        "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA,
        "seed": pycma_seed(seed),
        "popsize": int(popsize),
        "maxiter": int(maxiter),
        "CMA_mu": None,
        "verbose": -9,
        "verb_log": 0,
        "verb_disp": 0,
    }


def covariance(state: GlobalState) -> np.ndarray | None:
    """The global covariance as a [d, d] matrix (from the full matrix, its diagonal or its low-rank
    form: protos/covariance.py), or None for the identity."""
    d = state.mean.shape[0] if state.mean.shape else 0
    if len(state.mean.shape) != 1 or d < 1:
        raise ValueError(f"global mean must be a vector [d], got shape {state.mean.shape}")
    if state.cov_lowrank is not None:
        if state.cov_lowrank.vectors.shape[1] != d:
            raise ValueError(f"low-rank covariance of dimension {state.cov_lowrank.vectors.shape[1]} != {d}")
        return state.cov_lowrank.dense()
    if state.cov is None:
        return None
    cov = np.asarray(state.cov.numpy(), dtype=np.float64)
    if cov.shape == (d,):
        if (cov <= 0).any():
            raise ValueError("diagonal covariance must be positive")
        return np.diag(cov)
    if cov.shape == (d, d):
        return cov
    raise ValueError(f"covariance of shape {list(cov.shape)} does not fit a mean of dimension {d}")


def build_local_es(state: GlobalState, popsize: int, maxiter: int, seed: int) -> cma.CMAEvolutionStrategy:
    mean = np.array(state.mean.numpy(), dtype=np.float64)
    cov = covariance(state)
    es = cma.CMAEvolutionStrategy(mean, float(state.sigma), local_options(popsize, maxiter, seed))
    if cov is not None:
        # What _copy_light's _set_C_from does: replace C, then make B and D consistent with it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pycma warns about paths only when they are non-zero
            es.sm.C = cov.copy()
            es.sm.update_now(-1)
            es._updateBDfromSM()
    return es


def local_mu(popsize: int) -> int:
    """pycma's parent number for a population of ``popsize``: floor(popsize / 2)."""
    return int(cma.recombination_weights.RecombinationWeights(popsize).mu)
