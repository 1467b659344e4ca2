"""Which clients a round asks, and the seeds they get. Deterministic functions of the run seed, the
round and (for re-issues) the attempt, so a restarted coordinator makes the same choices."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def sample_size(frac: float, enrolled: int) -> int:
    """The reference's ``max(int(frac * clients), 1)``."""
    return max(int(frac * enrolled), 1)


def sample_clients(
    pool: Sequence[str], size: int, seed: int, round_: int, attempt: int, keep: Sequence[str] = ()
) -> list[str]:
    """``size`` clients of ``pool`` (in pool order): all of ``keep`` plus a seeded draw of the rest."""
    kept = set(keep)
    rest = [c for c in pool if c not in kept]
    need = min(max(0, size - len(kept)), len(rest))
    rng = np.random.default_rng([seed, round_, attempt])
    picked = {rest[int(i)] for i in rng.choice(len(rest), size=need, replace=False)} if need else set()
    chosen = kept | picked
    return [c for c in pool if c in chosen]


def client_seed(mode: str, seed: int, round_: int, client_id: str) -> int:
    """shared: the run seed (the reference: every client, every round); per_client: a seed in
    [1, 2^31 - 1] derived from (seed, round, client) — never 0, which pycma reads as "use the time"."""
    if mode == "shared":
        return seed
    digest = hashlib.sha256(f"{seed}:{round_}:{client_id}".encode()).digest()
    return 1 + int.from_bytes(digest[:8], "little") % (2**31 - 2)


def evaluates(eval_every: int, round_: int) -> bool:
    """Whether the clients of round r score the state they receive (state r) on their test split."""
    return eval_every > 0 and round_ % eval_every == 0
