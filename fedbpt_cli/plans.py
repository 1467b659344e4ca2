"""Named starting points for ``fedbpt simulate --preset NAME``; every flag given overrides them.

- ``demo``: what ``make demo`` runs: the embedded MiniLM on SST-2, sized to finish in minutes on
  2 CPU cores (short prompt, small intrinsic dimension, few rounds) while still beating zero-shot.
- ``reference``: the defaults of ALGORITHM.md (the reference job: 10 clients, L = 50, d = 500,
  200 shots per class, 200 rounds) for a machine that can afford it.
"""

from __future__ import annotations

from typing import Any

PLANS: dict[str, dict[str, Any]] = {
    "demo": {
        "clients": 3,
        "rounds": 12,
        "k_shot": 32,
        "test_limit": 400,
        "run": {
            "task": "sst2",
            "projection": {"seed": 1234, "intrinsic_dim": 100, "prompt_length": 5},
            "local_popsize": 5,
            "local_iters": 4,
            "perturb_rate": 0.5,
            "max_input_tokens": 48,
            "eval_every": 2,
            "round_timeout_s": 900,
        },
    },
    "reference": {
        "clients": 10,
        "rounds": 200,
        "k_shot": 200,
        "test_limit": None,
        "run": {},
    },
}
