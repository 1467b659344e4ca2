"""The covariance forms a task can carry (protos/covariance.py): what the low-rank form keeps,
that it always rebuilds a symmetric positive-definite matrix, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from protos import Array, GlobalState, RunConfig
from protos.covariance import LowRankCovariance, encode, wire_numbers


def _spectrum_matrix(eigenvalues: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    d = eigenvalues.shape[0]
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return (q * eigenvalues) @ q.T, q


def test_a_matrix_with_k_special_directions_is_rebuilt_exactly() -> None:
    """C = I except along 3 directions (two stretched, one shrunk): rank 3 loses nothing."""
    eigenvalues = np.ones(20)
    eigenvalues[[2, 7, 11]] = [4.0, 0.25, 2.0]
    c, _ = _spectrum_matrix(eigenvalues)
    form = LowRankCovariance.of(c, 3, "float64")
    assert form.rest == pytest.approx(1.0, abs=1e-12)
    assert sorted(form.values.numpy()) == pytest.approx([0.25, 2.0, 4.0], abs=1e-12)
    np.testing.assert_allclose(form.dense(), c, atol=1e-12)


def test_the_directions_kept_are_the_farthest_in_log_scale() -> None:
    """A direction shrunk to 1/8 is farther from the bulk than one stretched to 4: rank 1 keeps it."""
    eigenvalues = np.ones(10)
    eigenvalues[0], eigenvalues[5] = 0.125, 4.0
    c, q = _spectrum_matrix(eigenvalues, seed=3)
    form = LowRankCovariance.of(c, 1, "float64")
    assert form.values.numpy()[0] == pytest.approx(0.125)
    assert abs(float(form.vectors.numpy()[0] @ q[:, 0])) == pytest.approx(1.0)
    # The other 9 eigenvalues (one of them 4) are summarised by their mean.
    assert form.rest == pytest.approx((8 + 4.0) / 9)


@pytest.mark.parametrize("rank", [1, 4, 15])
def test_float32_forms_of_a_random_covariance_are_positive_definite(rank: int) -> None:
    a = np.random.default_rng(rank).standard_normal((16, 40))
    c = a @ a.T / 40 + 1e-3 * np.eye(16)
    dense = LowRankCovariance.of(c, rank).dense()
    np.testing.assert_array_equal(dense, dense.T)
    np.linalg.cholesky(dense)
    # The trace is kept up to float32 rounding: rest * (d - k) + sum(values) = trace(C).
    assert np.trace(dense) == pytest.approx(np.trace(c), rel=1e-5)


def test_the_low_rank_form_refuses_what_it_cannot_carry() -> None:
    c = np.eye(4)
    with pytest.raises(ValueError, match="rank must be"):
        LowRankCovariance.of(c, 4)
    v = Array.from_numpy(np.eye(4)[:2], dtype="float32")
    with pytest.raises(ValidationError, match="vectors \\[k, d\\] and values \\[k\\]"):
        LowRankCovariance(vectors=v, values=Array.from_numpy(np.ones(3), dtype="float32"), rest=1.0)
    with pytest.raises(ValidationError, match="send the full C"):
        LowRankCovariance(
            vectors=Array.from_numpy(np.eye(4), dtype="float32"),
            values=Array.from_numpy(np.ones(4), dtype="float32"),
            rest=1.0,
        )
    with pytest.raises(ValidationError, match="greater than 0"):
        LowRankCovariance(vectors=v, values=Array.from_numpy(np.ones(2), dtype="float32"), rest=0.0)
    negative = LowRankCovariance(vectors=v, values=Array.from_numpy(-np.ones(2), dtype="float32"), rest=1.0)
    with pytest.raises(ValueError, match="eigenvalues > 0"):
        negative.dense()


def test_a_state_carries_one_covariance_form() -> None:
    c = np.diag(np.arange(1.0, 7.0))
    fields = encode(c, "lowrank", rank=2, dtype="float32")
    mean = Array.from_numpy(np.zeros(6), dtype="float64")
    state = GlobalState(mean=mean, sigma=1.0, **fields)  # type: ignore[arg-type]
    assert state.cov is None and state.cov_lowrank is not None
    again = GlobalState.model_validate_json(state.model_dump_json())
    np.testing.assert_array_equal(again.cov_lowrank.dense(), state.cov_lowrank.dense())  # type: ignore[union-attr]
    with pytest.raises(ValidationError, match="not both"):
        GlobalState(mean=mean, sigma=1.0, cov=Array.from_numpy(np.ones(6)), cov_lowrank=state.cov_lowrank)
    assert encode(c, "identity", rank=2, dtype="float32") == {}
    diagonal = encode(c, "diagonal", rank=2, dtype="float32")["cov"]
    assert isinstance(diagonal, Array) and diagonal.data == Array.from_numpy(np.diag(c), dtype="float32").data


def test_run_config_checks_the_rank_against_the_dimension() -> None:
    d = RunConfig().dim  # 500, the paper's
    RunConfig(covariance="lowrank", covariance_rank=d - 1)
    with pytest.raises(ValidationError, match="must be below intrinsic_dim"):
        RunConfig(covariance="lowrank", covariance_rank=d)
    RunConfig(covariance="full", covariance_rank=d)  # the rank matters only to lowrank
    assert wire_numbers("lowrank", 500, 8) == 9 * 500 + 1
    assert wire_numbers("full", 500, 8) == 250_000
