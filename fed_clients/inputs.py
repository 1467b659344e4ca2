"""From labelled texts to what a score call takes: token ids (tokenised once by the service,
truncated to fit) and label indices (kept here)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fed_clients.data import DataError, LabeledTexts, clean_texts, encode_labels
from fed_clients.model_api import ModelService
from fed_clients.perturb import client_key_int
from fed_clients.presets import ResolvedTask

log = logging.getLogger(__name__)

# Special tokens around a row ([CLS] .. [SEP], <s> .. </s>) plus slack for template pieces that
# tokenise one or two ids longer in context than alone.
SPECIALS_AND_SLACK = 4
_SLOTS = re.compile(r"\{input\}|\{mask\}")


@dataclass(frozen=True)
class EncodedSplit:
    """Token ids of each input and its label index. ``dropped``: inputs with no tokens at all."""

    input_ids: list[list[int]]
    labels: np.ndarray
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def head(self, n: int) -> EncodedSplit:
        return EncodedSplit(self.input_ids[:n], self.labels[:n], self.truncated, self.dropped)


# Fewest examples a site must keep for training after its validation share is held out.
MIN_TRAIN_EXAMPLES = 2
# Keeps the validation draw apart from every other stream seeded by (run seed, site).
_VAL_STREAM = 0x7A1


def hold_out(
    split: EncodedSplit, share: float, seed: int, client_key: str
) -> tuple[EncodedSplit, EncodedSplit | None]:
    """(train, validation): ``floor(share * n)`` examples drawn for validation, deterministically from
    the run seed and the site's key (its name), so a restarted or rerun site holds out the same ones.
    A site too small to spare any (nothing drawn, or fewer than MIN_TRAIN_EXAMPLES left) validates
    nothing: (split, None)."""
    n_val = int(share * len(split))
    if n_val < 1 or len(split) - n_val < MIN_TRAIN_EXAMPLES:
        return split, None
    rng = np.random.default_rng([seed, client_key_int(client_key), _VAL_STREAM])
    order = rng.permutation(len(split))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return _take(split, train_idx), _take(split, val_idx)


def _take(split: EncodedSplit, index: np.ndarray) -> EncodedSplit:
    return EncodedSplit(
        [split.input_ids[i] for i in index], split.labels[index], split.truncated, split.dropped
    )


def input_budget(model: ModelService, task: ResolvedTask, prompt_length: int, max_input_tokens: int) -> int:
    """Most input tokens a row can hold: ``max_input_tokens``, and no more than the model's
    ``max_length`` leaves after the prompt rows, the template and the special tokens."""
    info = model.info()
    pieces = [p.strip() for p in _SLOTS.split(task.spec.template) if p.strip()]
    template_tokens = sum(len(ids) for ids in model.tokenize(pieces)) if pieces else 0
    mask = 1 if "{mask}" in task.spec.template else 0
    room = info.max_length - prompt_length - template_tokens - mask - SPECIALS_AND_SLACK
    if room < 1:
        raise DataError(
            f"the model's max_length {info.max_length} leaves no room for an input after {prompt_length} "
            f"prompt rows and the template ({template_tokens + mask} tokens)"
        )
    return min(max_input_tokens, room)


def encode_split(
    model: ModelService,
    data: LabeledTexts,
    task: ResolvedTask,
    budget: int,
    label_names: Sequence[str] | None = None,
) -> EncodedSplit:
    """Clean (per the task's dataset), tokenise via the service, truncate to ``budget`` ids, and
    map the labels to indices of the task's classes."""
    names = label_names if label_names is not None else task.class_names
    labels = encode_labels(data.labels, task.num_classes, names)
    ids = model.tokenize(clean_texts(data.texts, task.cleaning))
    truncated = sum(1 for x in ids if len(x) > budget)
    keep = [i for i, x in enumerate(ids) if x]
    dropped = len(ids) - len(keep)
    if dropped:
        log.warning("%s: %d input(s) tokenise to nothing and are left out", data.source, dropped)
    if not keep:
        raise DataError(f"{data.source}: no input has any tokens")
    return EncodedSplit([ids[i][:budget] for i in keep], labels[keep], truncated, dropped)
