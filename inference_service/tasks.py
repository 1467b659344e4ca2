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

from inference_service.heads import HEADS, HeadRules
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

    @property
    def rules(self) -> HeadRules:
        """What the head means for rows of this task (heads.py)."""
        return HEADS[self.head]


def compile_task(task: TaskSpec, head: Head, codec: TextCodec, max_length: int) -> CompiledTask:
    """Check the template and labels against the head and tokenise them; BadRequest says why not."""
    rules = HEADS[head]
    pieces = _pieces(rules.scored_template(task.template, codec), codec)
    spec = rules.labels(task.labels, codec, max_length)
    return CompiledTask(
        head=head,
        template=task.template,
        labels=tuple(task.labels),
        pieces=pieces,
        label_ids=spec.label_ids,
        anchor_ids=spec.anchor_ids,
    )


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
