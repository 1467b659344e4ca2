"""Wire schemas of the lean service link: register tokenised inputs once, score against a handle.

A site's inputs (its training ids, the round's perturbed copy, its validation and test ids) do not
change between the generations of a round, yet the stateless ``POST /v1/score`` carries them with
every call. ``POST /v1/inputs`` stores them in the service (flattened, in the smallest integer
dtype the vocabulary allows) and answers a handle; ``POST /v1/score/handle`` then carries only the
prompts and the handle. The handle is content-addressed: the SHA-256 of the ids (as int64 little
endian, so the wire dtype does not change it) and the per-input lengths, computable by the client
before it registers. The service keys its cache by (caller's API key, handle): a handle registered
under one key is unknown (404) to every other key.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Self

import numpy as np
from pydantic import Field, model_validator

from protos.arrays import Array
from protos.scoring import (
    MAX_TEXTS,
    ProjectionSpec,
    Strict,
    TaskSpec,
    TemplatePerturbation,
    check_prompt,
)

HANDLE_PATTERN = r"^[0-9a-f]{64}$"
_HANDLE_DOMAIN = b"fedbpt.inputs.v1\x00"
ID_DTYPES = ("uint16", "int32", "int64")


def ids_dtype(vocab_size: int) -> str:
    """The smallest wire dtype that holds every id of a ``vocab_size`` vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "int32" if vocab_size <= 2**31 else "int64"


def inputs_handle(ids: np.ndarray, lengths: np.ndarray) -> str:
    """The content address of B inputs: SHA-256 over a domain tag, the lengths and the ids (both
    as little-endian int64, whatever dtype they travel in)."""
    h = hashlib.sha256(_HANDLE_DOMAIN)
    h.update(np.ascontiguousarray(lengths, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    return h.hexdigest()


def flatten_inputs(input_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N] int64, lengths [B] int64) of ragged token id lists."""
    lengths = np.fromiter((len(row) for row in input_ids), dtype=np.int64, count=len(input_ids))
    total = int(lengths.sum())
    ids = np.fromiter((t for row in input_ids for t in row), dtype=np.int64, count=total)
    return ids, lengths


class PackedIds(Strict):
    """B token id lists as one flat id array and their lengths (the compact form of ragged ids).

    ``ids`` [N] in uint16, int32 or int64 (``pack`` picks the smallest that holds the vocabulary);
    ``lengths`` [B] int32, their sum N. ``POST /v1/tokenize`` answers in this form where the
    request's Accept names :data:`protos.frames.PACKED_IDS`.
    """

    ids: Array
    lengths: Array

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.ids.dtype not in ID_DTYPES or len(self.ids.shape) != 1:
            raise ValueError(
                f"ids must be a 1-D array of {'/'.join(ID_DTYPES)}; got {self.ids.dtype} {self.ids.shape}"
            )
        if self.lengths.dtype != "int32" or len(self.lengths.shape) != 1:
            raise ValueError(
                f"lengths must be a 1-D int32 array; got {self.lengths.dtype} {self.lengths.shape}"
            )
        count = self.lengths.shape[0]
        if not 1 <= count <= MAX_TEXTS:
            raise ValueError(f"lengths must hold 1 to {MAX_TEXTS} inputs; got {count}")
        lengths = self.lengths.numpy()
        if int(lengths.min()) < 0:
            raise ValueError("a length is negative")
        if int(lengths.astype(np.int64).sum()) != self.ids.shape[0]:
            raise ValueError(f"the lengths add up to {int(lengths.sum())} but ids holds {self.ids.shape[0]}")
        return self

    @classmethod
    def pack(cls, input_ids: Sequence[Sequence[int]], vocab_size: int) -> Self:
        ids, lengths = flatten_inputs(input_ids)
        return cls(
            ids=Array.from_numpy(ids, ids_dtype(vocab_size)),  # type: ignore[arg-type]
            lengths=Array.from_numpy(lengths, "int32"),
        )

    def input_ids(self) -> list[list[int]]:
        """The B inputs as token id lists again."""
        flat = self.ids.numpy().tolist()
        bounds = np.concatenate([[0], np.cumsum(self.lengths.numpy(), dtype=np.int64)]).tolist()
        return [flat[a:b] for a, b in itertools.pairwise(bounds)]

    @property
    def handle(self) -> str:
        return inputs_handle(self.ids.numpy(), self.lengths.numpy())


class InputsRegistration(PackedIds):
    """``POST /v1/inputs``: B tokenised inputs as one flat id array and their lengths.

    ``ids`` [N] in uint16, int32 or int64; ``lengths`` [B] int32 (every length >= 1, their sum N).
    Ids outside the vocabulary are refused by the service (400), as in ``/v1/score``.
    """

    @model_validator(mode="after")
    def _check_nonempty(self) -> Self:
        if int(self.lengths.numpy().min()) < 1:
            raise ValueError("every input needs at least one token (a length is below 1)")
        return self


class InputsHandle(Strict):
    """The answer to a registration: where the inputs are, how many, and for how long (idle)."""

    handle: str
    num_inputs: int
    num_ids: int
    stored_bytes: int = Field(description="what the entry takes of the service's input cache")
    ttl_s: float = Field(description="an entry unused this long is dropped (then: 404, register again)")


MAX_PARTS = 8


class HandlePart(Strict):
    """One registered input set of a handle call, scored as it is or with a template perturbation."""

    handle: str = Field(pattern=HANDLE_PATTERN)
    perturb_template: TemplatePerturbation | None = None


class HandleScoreRequest(Strict):
    """``POST /v1/score/handle``: a ``ScoreRequest`` whose inputs are registered handles.

    Same prompt fields and task as ``/v1/score``, same answer (``ScoreResponse``): the logits of
    every part, one after the other along B ([P, B_1 + .. + B_k, C]), for the same P prompts. A
    FedBPT generation scores its candidates on the clean and the perturbed copy of its inputs: as
    two parts of one call, the candidates travel once. Each part is one ``/v1/score`` call as far
    as ``max_rows`` goes (P x B_i). A handle this caller has not registered (never, under another
    API key, or evicted/expired) is a 404: register the inputs again and repeat the call.
    """

    projection: ProjectionSpec | None = None
    z: Array | None = None
    prompt_embeds: Array | None = None
    task: TaskSpec
    parts: list[HandlePart] = Field(min_length=1, max_length=MAX_PARTS)

    @model_validator(mode="after")
    def _check_prompt(self) -> HandleScoreRequest:
        check_prompt(self.projection, self.z, self.prompt_embeds)
        return self
