"""Named starting points for ``fedbpt simulate --preset NAME``; every flag given overrides them.

- ``demo``: what ``make demo`` runs: the embedded MiniLM on SST-2, sized to finish in under 10
  minutes on 2 CPU cores (3 clients, a 5-token prompt, d = 100, 10 rounds) and to beat zero-shot on
  the whole SST-2 validation set. It uses 100 shots per class (a larger training set generalises;
  with 32 the training loss fell but test accuracy barely moved) and turns input perturbation off:
  perturbation doubles the model queries of every generation and targets label-skewed (non-IID)
  data, while the demo's split is IID. ``--perturb`` turns it back on.
- ``reference``: the defaults of ALGORITHM.md (the reference job: 10 clients, L = 50, d = 500,
  200 shots per class, 200 rounds) for a machine that can afford it.
"""

from __future__ import annotations

from typing import Any

PLANS: dict[str, dict[str, Any]] = {
    "demo": {
        "clients": 3,
        "rounds": 10,
        "k_shot": 100,
        "test_limit": None,
        "run": {
            "task": "sst2",
            "projection": {"seed": 1234, "intrinsic_dim": 100, "prompt_length": 5},
            "local_popsize": 5,
            "local_iters": 3,
            "perturb": False,
            "max_input_tokens": 48,
            "eval_every": 1,
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
