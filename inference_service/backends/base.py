"""The backend interface: the one model-specific part of the service.

Everything else (validation, task compilation, row assembly, chunking, the projection) is shared;
a backend only answers "here are rows of token ids with the prompt slot and the prompt rows to add
or put in place; return the label logits [rows, C]" (see docs/inference_service.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from inference_service.text import TextCodec
from protos.scoring import Head

PromptMode = Literal["add", "replace"]


@dataclass
class RowBatch:
    """The rows of one forward pass.

    ``token_ids[r]`` is row r's whole sequence (special tokens included, unpadded); its prompt
    slot is ``[prompt_start, prompt_start + prompt_length)`` and holds placeholder ids. Row r takes
    prompt ``prompts[prompt_index[r]]`` ([L, hidden], on the backend's device, float32), which is
    *added* to (``prompt_mode="add"``: A.z) or *put in place of* (``"replace"``: prompt_embeds)
    what the model makes of the slot at the head's injection point. ``prompts`` is None when
    ``prompt_length`` is 0 (zero-shot).
    """

    token_ids: list[list[int]]
    prompt_start: int
    prompt_length: int
    prompt_index: list[int]
    prompts: torch.Tensor | None
    prompt_mode: PromptMode
    score_index: list[int]  # mlm: the mask; causal: the last token; embedding: unused
    label_ids: list[int] | None  # mlm, causal: the C label token ids

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def longest(self) -> int:
        return max(len(s) for s in self.token_ids)

    @property
    def real_tokens(self) -> int:
        return sum(len(s) for s in self.token_ids)

    def padded(
        self, side: Literal["left", "right"], pad_id: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [R, T], attention mask [R, T], offset [R]) padded to this batch's longest row;
        ``offset[r]`` is how far row r's tokens moved right (left padding), 0 for right padding."""
        rows, width = len(self.token_ids), self.longest
        ids = np.full((rows, width), pad_id, dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)
        offset = np.zeros(rows, dtype=np.int64)
        for r, seq in enumerate(self.token_ids):
            start = width - len(seq) if side == "left" else 0
            ids[r, start : start + len(seq)] = seq
            mask[r, start : start + len(seq)] = 1
            offset[r] = start
        return ids, mask, offset

    def row_prompts(self, dtype: torch.dtype) -> torch.Tensor:
        """The prompt rows of every row, [R, L, hidden] in ``dtype`` (gathered, not copied per P)."""
        assert self.prompts is not None
        index = torch.as_tensor(self.prompt_index, device=self.prompts.device)
        return self.prompts.index_select(0, index).to(dtype)


def inject_prompts(
    hidden: torch.Tensor, batch: RowBatch, offset: torch.Tensor | None = None, in_place: bool = False
) -> torch.Tensor:
    """Add (or put in place) each row's prompt at its prompt slot of ``hidden`` [R, T, H].

    ``offset`` [R] shifts the slot per row (left padding); None means the slot sits at the same
    columns in every row. Returns the new tensor (a copy unless ``in_place``)."""
    if batch.prompt_length == 0 or batch.prompts is None:
        return hidden
    out = hidden if in_place else hidden.clone()
    prompts = batch.row_prompts(out.dtype)
    s, length = batch.prompt_start, batch.prompt_length
    if offset is None:
        if batch.prompt_mode == "add":
            out[:, s : s + length] += prompts
        else:
            out[:, s : s + length] = prompts
        return out
    rows = torch.arange(out.shape[0], device=out.device)[:, None]
    cols = offset.to(out.device)[:, None] + s + torch.arange(length, device=out.device)[None, :]
    if batch.prompt_mode == "add":
        out[rows, cols] += prompts
    else:
        out[rows, cols] = prompts
    return out


def prompted_input_embeds(
    batch: RowBatch, embed: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """Each row's whole input embedding [T_r, hidden], unpadded, with its prompt added (or put in
    place) at the slot: what a backend that takes ``prompt_embeds`` per sequence (vLLM) feeds.
    ``embed`` maps token ids [R, T] to word embeddings [R, T, hidden] (the model's own table)."""
    ids, _, _ = batch.padded("right", 0)
    device = batch.prompts.device if batch.prompts is not None else None
    embeds = inject_prompts(embed(torch.from_numpy(ids).to(device)), batch, in_place=True)
    return [embeds[r, : len(seq)] for r, seq in enumerate(batch.token_ids)]


def embedding_matrix_std(weight: torch.Tensor, scale: float | None = None) -> float:
    """std of every entry of a word-embedding matrix (BBT's projection scale), in float64 over row
    blocks (no float32 copy of a large table); ``scale``: a factor the embedding module applies
    to its rows (Gemma's sqrt(hidden))."""
    weight = weight.detach()
    count = weight.numel()
    total = sum(float(block.double().sum()) for block in weight.split(8192))
    mean = total / count
    squares = sum(float((block.double() - mean).pow(2).sum()) for block in weight.split(8192))
    std = (squares / max(count - 1, 1)) ** 0.5
    return std * float(scale) if scale is not None else std


@dataclass(frozen=True)
class ModelDescription:
    """What the service may tell about its model (``GET /v1/model``) and what scoring needs."""

    model_id: str
    head: Head
    hidden_size: int
    vocab_size: int  # rows of the input embedding matrix: valid token ids are [0, vocab_size)
    max_length: int
    dtype: str
    device: str
    backend: str


class Backend(ABC):
    """One loaded model serving one head. Subclasses implement :meth:`label_logits`; the
    embedding head implements :meth:`sentence_embeddings` instead (cosine to the anchors is shared).

    Methods are called from one worker thread at a time, under ``torch.inference_mode``.
    """

    description: ModelDescription
    codec: TextCodec
    device: torch.device
    # Padded tokens per forward pass when FEDBPT_MAX_BATCH_TOKENS is unset (None: the scorer's
    # CPU/GPU default). A backend that schedules rows itself (vLLM) can ask for one big chunk.
    preferred_batch_tokens: int | None = None

    @property
    def head(self) -> Head:
        return self.description.head

    @abstractmethod
    def embedding_std(self) -> float:
        """std of every entry of the input word-embedding matrix (BBT's projection scale)."""

    @abstractmethod
    def placeholder_embeddings(self, ids: list[int], prompt_start: int) -> torch.Tensor:
        """p0 [L, hidden], float32: what the model makes of placeholder ``ids`` at the prompt slot,
        at the point where A.z is added (so ``prompt_embeds = p0 + A.z`` scores the same)."""

    def label_logits(self, batch: RowBatch) -> torch.Tensor:
        """Logits [R, C] (float32, CPU) of ``batch.label_ids`` at each row's scored position."""
        raise NotImplementedError(f"{type(self).__name__} does not score label words")

    def sentence_embeddings(self, batch: RowBatch) -> torch.Tensor:
        """Pooled sentence embeddings [R, E] (float32), prompt rows left out of the pooling."""
        raise NotImplementedError(f"{type(self).__name__} does not embed sentences")

    def failure(self) -> str | None:
        """Why this backend can no longer score (an engine process that died), or None."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to stop
        """Free the model (a backend with an engine process stops it here)."""
