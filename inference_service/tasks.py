"""Task compilation: a ``TaskSpec`` (template + labels) becomes token pieces and label ids once per
(head, template, labels), cached, for every backend.

Template pieces are tokenised in context (see ``text.py``): the piece before the first slot as if it
followed a word and a space (it follows the prompt's placeholder words), every other piece with the
whitespace the template gives it. Trailing whitespace of a piece is dropped: the next slot brings
its own boundary (inputs are tokenised with a leading space; mask tokens absorb spaces; a causal
label word follows the template with a space).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from inference_service.errors import BadRequest
from inference_service.text import TextCodec
from protos.scoring import INPUT_SLOT, MASK_SLOT, Head, TaskSpec

_SLOTS = re.compile(r"(\{input\}|\{mask\})")


@dataclass(frozen=True)
class Piece:
    """One part of a row's template: fixed ids, the input's ids, or the mask token."""

    kind: Literal["text", "input", "mask"]
    ids: tuple[int, ...] = ()


@dataclass
class CompiledTask:
    head: Head
    template: str
    labels: tuple[str, ...]
    pieces: tuple[Piece, ...]
    label_ids: tuple[int, ...] | None = None  # mlm, causal: one vocabulary id per label
    anchor_ids: tuple[tuple[int, ...], ...] | None = None  # embedding: each anchor sentence's row
    # Backend-specific derived state (e.g. the anchors' embeddings), filled on first use.
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def compile_task(task: TaskSpec, head: Head, codec: TextCodec, max_length: int) -> CompiledTask:
    """Check the template and labels against the head and tokenise them; BadRequest says why not."""
    template = _template_for_head(task.template, head, codec)
    labels = tuple(task.labels)
    pieces = _pieces(template, codec)
    compiled = CompiledTask(head=head, template=task.template, labels=labels, pieces=pieces)
    if head == "embedding":
        compiled.anchor_ids = _anchor_ids(labels, codec, max_length)
    else:
        compiled.label_ids = _label_ids(labels, head, codec)
    return compiled


def _template_for_head(template: str, head: Head, codec: TextCodec) -> str:
    """The template the head scores (causal: cut at its trailing answer slot), or BadRequest."""
    has_mask = MASK_SLOT in template
    if head == "mlm":
        if not has_mask:
            raise BadRequest(
                f"the mlm head scores the {MASK_SLOT} position; the template has none: {template!r}"
            )
        if codec.mask_token_id is None:
            raise BadRequest("this model's tokenizer has no mask token; it cannot serve the mlm head")
    elif head == "causal" and has_mask:
        before, after = template.split(MASK_SLOT, 1)
        if after.strip():
            raise BadRequest(
                f"for the causal head {MASK_SLOT} marks the answer position and must end the template; "
                f"found {after!r} after it"
            )
        return before
    elif head == "embedding" and has_mask:
        raise BadRequest(
            f"the embedding head compares the pooled input with the label anchors; remove {MASK_SLOT} "
            f"from the template {template!r}"
        )
    return template


def _pieces(template: str, codec: TextCodec) -> tuple[Piece, ...]:
    """The template as input / mask / text pieces, each text tokenised in its context."""
    pieces: list[Piece] = []
    for k, part in enumerate(_SLOTS.split(template)):
        if part == INPUT_SLOT:
            pieces.append(Piece("input"))
        elif part == MASK_SLOT:
            assert codec.mask_token_id is not None
            pieces.append(Piece("mask", (codec.mask_token_id,)))
        else:
            text = part.rstrip()
            if k == 0:
                text = text.lstrip()
            if not text:
                continue
            ids = codec.encode_in_context([text], leading_space=(k == 0))[0]
            if ids:
                pieces.append(Piece("text", tuple(ids)))
    return tuple(pieces)


def _anchor_ids(labels: tuple[str, ...], codec: TextCodec, max_length: int) -> tuple[tuple[int, ...], ...]:
    """The embedding head's label anchors: each label sentence as a whole model input."""
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
    return tuple(rows)


def _label_ids(labels: tuple[str, ...], head: Head, codec: TextCodec) -> tuple[int, ...]:
    """One distinct vocabulary id per label word. mlm: BBT's verbaliser, the word's first token
    without a leading space; causal: the first token of the word as it follows the template."""
    words = [label.strip() for label in labels]
    encoded = [codec.encode(w) for w in words] if head == "mlm" else codec.encode_in_context(words)
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


class TaskCache:
    """Compiled tasks by (head, template, labels): each template is tokenised once."""

    def __init__(self, codec: TextCodec, head: Head, max_length: int, size: int = 64) -> None:
        self.codec = codec
        self.head = head
        self.max_length = max_length
        self.size = size
        self._items: OrderedDict[tuple[str, tuple[str, ...]], CompiledTask] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, task: TaskSpec) -> CompiledTask:
        key = (task.template, tuple(task.labels))
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        compiled = compile_task(task, self.head, self.codec, self.max_length)
        with self._lock:
            self._items[key] = compiled
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return compiled
