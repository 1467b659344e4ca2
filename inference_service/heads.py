"""What each head means for a task and a row, in one place: ``HEADS[name]``.

A head decides (1) which templates it can score and what it scores of them, (2) what the labels
become (vocabulary ids whose logits are read, or anchor sentences compared with the pooled row),
(3) whether the model's closing special tokens follow the template, and (4) which position of a row
is scored. Task compilation (tasks.py), row building (rows.py) and the scorer (scoring.py) ask the
head instead of comparing its name; the model classes a backend loads per head stay in the backend.

- ``mlm`` (BBT, FedBPT's paper): the logits of the label words' first tokens at the ``{mask}`` slot.
- ``causal``: the logits of the label words' first tokens after the template's last token
  (``{mask}``, if present, must end the template and is cut off).
- ``embedding``: cosine between the mean-pooled row and each label's anchor sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inference_service.errors import BadRequest
from inference_service.text import TextCodec
from protos.scoring import MASK_SLOT, Head


@dataclass(frozen=True)
class LabelSpec:
    """The labels as a head reads them: vocabulary ids, or each anchor sentence's row."""

    label_ids: tuple[int, ...] | None = None
    anchor_ids: tuple[tuple[int, ...], ...] | None = None


class MaskedLM:
    name: Head = "mlm"
    closing_specials = True  # [SEP] / </s> after the template, as in pre-training
    reads_label_logits = True

    def scored_template(self, template: str, codec: TextCodec) -> str:
        if MASK_SLOT not in template:
            raise BadRequest(
                f"the mlm head scores the {MASK_SLOT} position; the template has none: {template!r}"
            )
        if codec.mask_token_id is None:
            raise BadRequest("this model's tokenizer has no mask token; it cannot serve the mlm head")
        return template

    def labels(self, labels: Sequence[str], codec: TextCodec, max_length: int) -> LabelSpec:
        # BBT's verbaliser: the word's first token, without a leading space.
        return LabelSpec(label_ids=_first_ids(labels, [codec.encode(w.strip()) for w in labels]))

    def score_index(self, length: int, mask_at: int) -> int:
        return mask_at


class CausalLM:
    name: Head = "causal"
    closing_specials = False  # the next token after the template is scored: nothing may follow it
    reads_label_logits = True

    def scored_template(self, template: str, codec: TextCodec) -> str:
        if MASK_SLOT not in template:
            return template
        before, after = template.split(MASK_SLOT, 1)
        if after.strip():
            raise BadRequest(
                f"for the causal head {MASK_SLOT} marks the answer position and must end the template; "
                f"found {after!r} after it"
            )
        return before

    def labels(self, labels: Sequence[str], codec: TextCodec, max_length: int) -> LabelSpec:
        # The label word as it follows the template (after a space): its first token.
        words = [w.strip() for w in labels]
        return LabelSpec(label_ids=_first_ids(labels, codec.encode_in_context(words)))

    def score_index(self, length: int, mask_at: int) -> int:
        return length - 1


class SentenceEmbedding:
    name: Head = "embedding"
    closing_specials = True
    reads_label_logits = False  # logits are scaled cosines to the anchors (Scorer.logits)

    def scored_template(self, template: str, codec: TextCodec) -> str:
        if MASK_SLOT in template:
            raise BadRequest(
                f"the embedding head compares the pooled input with the label anchors; remove {MASK_SLOT} "
                f"from the template {template!r}"
            )
        return template

    def labels(self, labels: Sequence[str], codec: TextCodec, max_length: int) -> LabelSpec:
        rows = []
        for label in labels:
            ids = codec.encode(label.strip())
            if not ids:
                raise BadRequest(f"label anchor {label!r} tokenises to no tokens")
            row = (*codec.prefix_special, *ids, *codec.suffix_special)
            if len(row) > max_length:
                raise BadRequest(
                    f"label anchor {label!r} is {len(row)} tokens; the model's max_length is {max_length}"
                )
            rows.append(row)
        return LabelSpec(anchor_ids=tuple(rows))

    def score_index(self, length: int, mask_at: int) -> int:
        return 0  # the row is pooled: no position is read (0 by convention)


HeadRules = MaskedLM | CausalLM | SentenceEmbedding
HEADS: dict[Head, HeadRules] = {h.name: h for h in (MaskedLM(), CausalLM(), SentenceEmbedding())}


def _first_ids(labels: Sequence[str], encoded: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Each label word's first token id; BadRequest for an empty word or two words sharing one."""
    seen: dict[int, str] = {}
    for label, ids in zip(labels, encoded, strict=True):
        if not ids:
            raise BadRequest(f"label word {label!r} tokenises to no tokens")
        if ids[0] in seen:
            raise BadRequest(
                f"label words {seen[ids[0]]!r} and {label!r} both start with token id {ids[0]}; "
                "their logits would be identical"
            )
        seen[ids[0]] = label
    return tuple(seen)
