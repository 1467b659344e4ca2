"""Input perturbation (FedBPT §4.4; ALGORITHM.md step 2): a fresh perturbed copy of the local
inputs each round, in which every input token is replaced by a uniform random vocabulary id with
probability ``rate``.

Seeding: one ``numpy.random.SeedSequence`` per (run seed, round, client), so a copy is
reproducible, differs between rounds and between clients, and never touches numpy's global RNG
(which pycma owns).

Scopes (``RunConfig.perturb_scope``):
- ``input`` (default): only the input-text ids the client holds; replacements are drawn from the
  vocabulary without the model's special ids (so a perturbed row keeps its structure).
- ``all`` (the reference: every attended position): input ids are drawn from the whole vocabulary,
  as the reference does, and the score calls carry ``perturb_template`` (rate and a per-round seed)
  so that the service perturbs what the client cannot see: special tokens, prompt placeholders,
  template words and the mask.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protos import TemplatePerturbation


def client_key_int(client_key: str) -> int:
    """A stable 64-bit integer of a client's identity (its name in the run) for seeding."""
    return int.from_bytes(hashlib.sha256(client_key.encode()).digest()[:8], "little")


def round_seed(run_seed: int, round_: int, client_key: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(run_seed), int(round_), client_key_int(client_key)])


def replacement_pool(vocab_size: int, excluded: Sequence[int] = ()) -> np.ndarray:
    """The ids a perturbed token may become: the vocabulary minus ``excluded``."""
    pool = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), np.asarray(list(excluded), dtype=np.int64))
    if pool.size == 0:
        raise ValueError("no vocabulary ids left to draw replacements from")
    return pool


def perturb_ids(
    ids: Sequence[Sequence[int]], rate: float, pool: np.ndarray, rng: np.random.Generator
) -> list[list[int]]:
    """Each id replaced, with probability ``rate``, by a uniform draw from ``pool``."""
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for s in ids for t in s), dtype=np.int64, count=int(lengths.sum()))
    hit = rng.random(flat.size) < rate
    flat[hit] = pool[rng.integers(0, pool.size, size=int(hit.sum()))]
    return [part.tolist() for part in np.split(flat, np.cumsum(lengths)[:-1])] if len(ids) else []


@dataclass(frozen=True)
class PerturbedCopy:
    input_ids: list[list[int]]
    template: TemplatePerturbation | None  # scope "all": what the service must perturb


@dataclass(frozen=True)
class Perturber:
    """Makes a round's perturbed copy for one model (vocabulary, special ids) and config."""

    vocab_size: int
    special_ids: tuple[int, ...]
    rate: float
    scope: str = "input"

    def __post_init__(self) -> None:
        if self.scope not in ("input", "all"):
            raise ValueError(f"unknown perturb scope {self.scope!r}")
        if not 0 <= self.rate <= 1:
            raise ValueError("perturb rate must be in [0, 1]")

    def pool(self) -> np.ndarray:
        return replacement_pool(self.vocab_size, () if self.scope == "all" else self.special_ids)

    def copy(
        self, ids: Sequence[Sequence[int]], run_seed: int, round_: int, client_key: str
    ) -> PerturbedCopy:
        seq = round_seed(run_seed, round_, client_key)
        input_seq, template_seq = seq.spawn(2)
        perturbed = perturb_ids(ids, self.rate, self.pool(), np.random.default_rng(input_seq))
        template = None
        if self.scope == "all":
            seed = int(template_seq.generate_state(1, np.uint64)[0]) >> 1  # 63 bits: the schema's range
            template = TemplatePerturbation(rate=self.rate, seed=seed)
        return PerturbedCopy(perturbed, template)
