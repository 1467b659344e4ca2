"""What a simulation will cost, said before it starts: the model rows it scores (a row is one
candidate prompt on one input), per round and in all, from the run's settings and the data sizes;
and, once the service has scored something, the time at the rate it measured.

Rows per round, per sampled client with n examples (a share ``val_share`` held out):
``local_iters * popsize * n_train`` for the generations plus one row per example for the final
mean, each doubled with input perturbation (a perturbed copy is scored beside the clean one), plus
``n_val`` rows of validation of the state received, plus the client's test shard in evaluated
rounds. Then the selected and the final prompt on the whole test set. With ``shared_es`` a round
is ``popsize * n_train`` training rows (the candidates, once each) plus the validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protos import RunConfig

# Above this many minutes, a run without a preset is told about ``--preset demo``.
LONG_RUN_MINUTES = 20.0


@dataclass(frozen=True)
class RowEstimate:
    per_round: int  # training and validation rows of one round (every client sampled)
    evaluation: int  # rows of one evaluation of the global state on the clients' test shards
    total: int  # the whole run, the final scoring of the selected and final prompts included

    def minutes(self, rows_per_s: float) -> float:
        return self.total / rows_per_s / 60.0 if rows_per_s > 0 else math.inf


def estimate_rows(
    config: RunConfig, examples_per_client: list[int], round_test_size: int, test_size: int
) -> RowEstimate:
    sampled = max(1, math.ceil(config.frac * len(examples_per_client)))
    share = sampled / max(1, len(examples_per_client))
    if config.searches_locally:
        copies, per_example = (2 if config.perturb else 1), config.local_iters * config.local_popsize + 1
    else:
        copies, per_example = 1, config.local_popsize
    per_round = 0.0
    for n in examples_per_client:
        n_val = int(n * config.val_share) if n * (1 - config.val_share) >= 2 else 0
        n_train = n - n_val
        per_round += share * (copies * n_train * per_example + n_val)
    evaluations = sum(1 for r in range(config.rounds) if config.eval_every > 0 and r % config.eval_every == 0)
    evaluation = round_test_size
    total = config.rounds * per_round + (evaluations + 1) * evaluation + 2 * test_size
    return RowEstimate(per_round=round(per_round), evaluation=evaluation, total=round(total))


def describe(estimate: RowEstimate, rows_per_s: float | None, preset: str | None) -> list[str]:
    """The lines to print: the size, the time at the measured rate, and a hint when it is long."""
    lines = [
        f"this run scores about {estimate.total:,} model rows ({estimate.per_round:,} per round of "
        f"training and validation, {estimate.evaluation:,} per evaluation)"
    ]
    if rows_per_s is None:
        return lines
    minutes = estimate.minutes(rows_per_s)
    lines.append(
        f"at the {rows_per_s:,.0f} rows/s the service just measured (zero-shot rows, without the prompt's "
        f"tokens): about {minutes:,.0f} min or more"
    )
    if preset is None and minutes > LONG_RUN_MINUTES:
        lines.append(
            "[yellow]that is long:[/] `--preset demo` (3 clients, L = 5, d = 100, 10 rounds) "
            "takes minutes; or lower --rounds, --clients, --k-shot, --local-iters"
        )
    return lines
