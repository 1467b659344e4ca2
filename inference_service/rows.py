"""Row assembly, backend-neutral: B inputs + a compiled task -> B model sequences.

Every one of the P candidate prompts reuses the same B sequences (the prompt rows differ, the token
ids do not), so a call of P x B rows builds B sequences once. Layout per head (docs/design.md):

    mlm        [CLS] P1..PL pieces(with input and [MASK]) [SEP]   scored: the mask
    causal     BOS   P1..PL pieces(ending where the answer goes)   scored: the last token
    embedding  [CLS] P1..PL pieces(with input) [SEP]               pooled, prompt rows left out

P1..PL are the prompt's initial token ids (``TextCodec.prompt_ids``: BBT's placeholder ids, or the
tokens of ``projection.init_text``); the backend adds A.z to, or puts ``prompt_embeds`` in place
of, what the model makes of them (p0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from inference_service.errors import BadRequest
from inference_service.tasks import CompiledTask
from inference_service.text import TextCodec
from protos.scoring import TemplatePerturbation


@dataclass
class Sequences:
    """The B sequences of one call (no padding) and where things sit in them."""

    token_ids: list[list[int]]
    prompt_start: int  # index of P1 (right after the leading special tokens)
    prompt_length: int  # L, 0 for zero-shot
    score_index: list[int]  # per sequence: the scored position (mlm: mask; causal: last; embedding: 0)
    input_spans: list[tuple[int, int]]  # per sequence: [start, end) of the input's ids

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.token_ids]


def assemble(
    task: CompiledTask,
    inputs: Sequence[Sequence[int]],
    codec: TextCodec,
    prompt_length: int,
    max_length: int,
    init_text: str | None = None,
) -> Sequences:
    """Build the B sequences; BadRequest if any is longer than ``max_length``, saying by how much.
    The prompt slot holds ``codec.prompt_ids(prompt_length, init_text)`` (p0's tokens)."""
    head_ids = list(codec.prefix_special)
    rules = task.rules
    tail_ids = list(codec.suffix_special) if rules.closing_specials else []
    try:
        prompt_ids = codec.prompt_ids(prompt_length, init_text) if prompt_length else []
    except ValueError as exc:
        raise BadRequest(f"projection.{exc}") from None
    lead = [*head_ids, *prompt_ids]

    sequences: list[list[int]] = []
    score_index: list[int] = []
    spans: list[tuple[int, int]] = []
    for ids in inputs:
        seq = list(lead)
        span = (0, 0)
        mask_at = 0
        for piece in task.pieces:
            if piece.kind == "input":
                span = (len(seq), len(seq) + len(ids))
                seq.extend(ids)
            else:
                if piece.kind == "mask":
                    mask_at = len(seq)
                seq.extend(piece.ids)
        seq.extend(tail_ids)
        sequences.append(seq)
        spans.append(span)
        score_index.append(rules.score_index(len(seq), mask_at))

    too_long = [(b, len(s)) for b, s in enumerate(sequences) if len(s) > max_length]
    if too_long:
        b, n = max(too_long, key=lambda t: t[1])
        raise BadRequest(
            f"{len(too_long)} input(s) make sequences longer than the model's max_length {max_length}: "
            f"the longest, input {b}, is {n} tokens ({len(inputs[b])} input tokens, {prompt_length} prompt rows, "
            f"{n - len(inputs[b]) - prompt_length} template and special tokens); shorten it by {n - max_length} tokens"
        )
    return Sequences(sequences, len(head_ids), prompt_length, score_index, spans)


def perturb_template(seqs: Sequences, perturbation: TemplatePerturbation, vocab_size: int) -> None:
    """Replace each non-input position (special tokens, placeholders, template words, mask) by a
    uniform random vocabulary id with probability ``rate``; sequence b draws from (seed, b), so every
    candidate prompt sees the same perturbed copy. In place."""
    if perturbation.rate <= 0:
        return
    for b, seq in enumerate(seqs.token_ids):
        rng = np.random.default_rng([perturbation.seed, b])
        n = len(seq)
        hit = rng.random(n) < perturbation.rate
        new_ids = rng.integers(0, vocab_size, size=n)
        start, end = seqs.input_spans[b]
        hit[start:end] = False
        for i in np.flatnonzero(hit):
            seq[int(i)] = int(new_ids[i])


def plan_chunks(
    lengths: Sequence[int], num_prompts: int, max_batch_tokens: int, bucketing: bool = True
) -> list[list[int]]:
    """Split the P x B rows (row r = p * B + b) into forward passes of at most ``max_batch_tokens``
    padded tokens (rows x the chunk's longest row; a single longer row goes alone). With
    ``bucketing`` rows are sorted by length first, so each chunk pads only to rows of similar length;
    rows of equal length go input by input, so one input's P candidates share a pass and differ
    only by their prompts when CMA-ES ranks them (kernels may tile two passes differently)."""
    num_inputs = len(lengths)
    row_lengths = [lengths[r % num_inputs] for r in range(num_prompts * num_inputs)]
    return plan_rows(
        row_lengths, max_batch_tokens, bucketing, tiebreak=lambda r: (r % num_inputs, r // num_inputs)
    )


def plan_rows(
    row_lengths: Sequence[int],
    max_batch_tokens: int,
    bucketing: bool = True,
    tiebreak: Callable[[int], tuple[int, ...]] = lambda r: (r,),
) -> list[list[int]]:
    """Chunks of row indices (rows of any origin, e.g. several requests merged) within the token
    budget; rows of equal length are ordered by ``tiebreak``."""
    rows = list(range(len(row_lengths)))
    if bucketing:
        rows.sort(key=lambda r: (row_lengths[r], *tiebreak(r)))
    chunks: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for r in rows:
        n = row_lengths[r]
        if current and (len(current) + 1) * max(longest, n) > max_batch_tokens:
            chunks.append(current)
            current, longest = [], 0
        current.append(r)
        longest = max(longest, n)
    if current:
        chunks.append(current)
    return chunks
