"""The cost estimate ``fedbpt simulate`` prints before a run: rows counted from the settings and
data sizes by the rule in fedbpt_cli/estimate.py, checked against a hand count; the hint for long
runs appears only when the estimate is long and no preset was chosen."""

from __future__ import annotations

from fedbpt_cli.estimate import LONG_RUN_MINUTES, describe, estimate_rows
from protos import RunConfig


def test_rows_by_hand() -> None:
    """2 clients with 8 and 4 examples, a quarter held out: 6 + 2 and 3 + 1. Each round: per
    client (iters * popsize + 1) rows per training example, doubled by perturbation, plus its
    validation rows. Breaks caught: perturbation not doubling, validation rows counted as training."""
    config = RunConfig.model_validate(
        {
            "rounds": 4,
            "local_iters": 3,
            "local_popsize": 5,
            "perturb": True,
            "val_share": 0.25,
            "eval_every": 2,
        }
    )
    est = estimate_rows(config, [8, 4], round_test_size=100, test_size=400)
    per_round = 2 * 6 * 16 + 2 + 2 * 3 * 16 + 1
    assert est.per_round == per_round
    assert est.evaluation == 100
    assert est.total == 4 * per_round + (2 + 1) * 100 + 2 * 400  # rounds 0 and 2, the final state, 2 prompts
    plain = estimate_rows(config.model_copy(update={"perturb": False}), [8, 4], 100, 400)
    assert plain.per_round == 6 * 16 + 2 + 3 * 16 + 1
    # shared_es: each training example once per candidate, perturbation or not; no final mean.
    shared = estimate_rows(config.model_copy(update={"aggregator": "shared_es"}), [8, 4], 100, 400)
    assert shared.per_round == 6 * 5 + 2 + 3 * 5 + 1


def test_sampling_scales_the_rounds() -> None:
    config = RunConfig.model_validate(
        {"rounds": 1, "local_iters": 1, "local_popsize": 2, "perturb": False, "frac": 0.5}
    )
    full = estimate_rows(config.model_copy(update={"frac": 1.0}), [4] * 4, 0, 0)
    half = estimate_rows(config, [4] * 4, 0, 0)
    assert half.per_round * 2 == full.per_round


def test_the_hint_only_for_long_runs_without_a_preset() -> None:
    config = RunConfig.model_validate({"rounds": 10, "local_iters": 8, "local_popsize": 5})
    est = estimate_rows(config, [100] * 10, 1000, 1000)
    slow = est.total / (LONG_RUN_MINUTES * 60) / 2  # rows/s that make it twice the threshold
    assert any("--preset demo" in line for line in describe(est, slow, None))
    assert not any("--preset demo" in line for line in describe(est, slow, "reference"))
    assert not any("--preset demo" in line for line in describe(est, est.total, None))  # one second
    assert len(describe(est, None, None)) == 1  # no rate measured yet: the size only
