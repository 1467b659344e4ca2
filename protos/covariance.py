"""The forms in which the server's covariance C travels to the clients (``RunConfig.covariance``).

The server always keeps its full d x d C (pycma's state); only what a task carries differs, and the
client rebuilds a d x d matrix from it (``dense``) before its local ES samples:

- ``full``: C itself ([d, d]).
- ``diagonal``: diag(C) ([d]); C's correlations are dropped.
- ``lowrank``: C ~ rest * I + sum_i (values_i - rest) v_i v_i^T, the k eigen-directions of C whose
  eigenvalues lie farthest (in log scale) from the median of its spectrum, their eigenvalues, and
  the mean of the other d - k eigenvalues (``rest``). Exact along the k directions and on average
  elsewhere; always symmetric positive-definite. (k + 1) d + 1 numbers instead of d^2.
- ``identity``: nothing (null); the clients sample from sigma^2 I.

Both sides import this module, so the server's encoding and the clients' decoding cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from protos.arrays import Array, DType
from protos.scoring import Strict

CovarianceForm = Literal["full", "diagonal", "lowrank", "identity"]


class LowRankCovariance(Strict):
    """C = rest * I + sum_i (values_i - rest) v_i v_i^T with orthonormal rows v_i of ``vectors``."""

    vectors: Array = Field(description="[k, d]: orthonormal eigen-directions of C")
    values: Array = Field(description="[k]: C's eigenvalues along them (> 0)")
    rest: float = Field(gt=0, description="the mean of C's other d - k eigenvalues")

    @model_validator(mode="after")
    def _shapes(self) -> LowRankCovariance:
        v, s = self.vectors.shape, self.values.shape
        if len(v) != 2 or len(s) != 1 or v[0] != s[0] or v[0] < 1:
            raise ValueError(f"low-rank covariance needs vectors [k, d] and values [k]; got {v} and {s}")
        if v[0] >= v[1]:
            raise ValueError(f"low-rank covariance with k = {v[0]} >= d = {v[1]}: send the full C instead")
        return self

    @classmethod
    def of(cls, matrix: np.ndarray, rank: int, dtype: DType = "float32") -> LowRankCovariance:
        """The rank-``rank`` form of a symmetric positive-definite ``matrix`` (rank < d)."""
        d = matrix.shape[0]
        if not 1 <= rank < d:
            raise ValueError(f"rank must be in [1, {d - 1}] for a {d} x {d} covariance, got {rank}")
        eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
        eigenvalues = np.maximum(eigenvalues, np.finfo(np.float64).tiny)
        distance = np.abs(np.log(eigenvalues) - np.log(np.median(eigenvalues)))
        # Farthest first; ties (a flat spectrum) broken by index, so every replica picks the same.
        keep = np.sort(np.argsort(-distance, kind="stable")[:rank])
        others = np.setdiff1d(np.arange(d), keep)
        return cls(
            vectors=Array.from_numpy(eigenvectors[:, keep].T, dtype=dtype),
            values=Array.from_numpy(eigenvalues[keep], dtype=dtype),
            rest=float(np.mean(eigenvalues[others])),
        )

    def dense(self) -> np.ndarray:
        """The d x d matrix this form stands for (float64)."""
        v = np.asarray(self.vectors.numpy(), dtype=np.float64)
        values = np.asarray(self.values.numpy(), dtype=np.float64)
        if (values <= 0).any() or not np.all(np.isfinite(v)):
            raise ValueError("low-rank covariance needs finite vectors and eigenvalues > 0")
        matrix = (v.T * (values - self.rest)) @ v
        matrix = (matrix + matrix.T) / 2  # exact symmetry, whatever the matmul's rounding
        matrix[np.diag_indices_from(matrix)] += self.rest
        return matrix


def encode(matrix: np.ndarray, form: CovarianceForm, *, rank: int, dtype: DType) -> dict[str, object]:
    """The ``GlobalState`` fields that carry ``matrix`` in ``form`` (``cov`` or ``cov_lowrank``)."""
    encoders: dict[str, Callable[[], dict[str, object]]] = {
        "full": lambda: {"cov": Array.from_numpy(matrix, dtype=dtype)},
        "diagonal": lambda: {"cov": Array.from_numpy(np.diag(matrix), dtype=dtype)},
        "lowrank": lambda: {"cov_lowrank": LowRankCovariance.of(matrix, rank, dtype)},
        "identity": lambda: {},
    }
    return encoders[form]()


def wire_numbers(form: CovarianceForm, d: int, rank: int) -> int:
    """How many numbers a task's covariance carries in ``form`` (for estimates and docs)."""
    return {"full": d * d, "diagonal": d, "lowrank": (rank + 1) * d + 1, "identity": 0}[form]
