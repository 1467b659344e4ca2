"""The white-box baseline: federated soft-prompt tuning with backpropagation (FedPrompt-style).

It needs the model's weights and gradients, so it runs in process on the inference service's own
objects (backend, task compilation, row assembly) rather than over the wire: the same model, the
same template, the same prompt slot and the same logits as the black-box methods. The prompt is
the full L x hidden matrix added at the prompt slot (where the black-box methods add A.z) to the
same p0 (``projection.init`` / ``init_text``), starting from zero, i.e. from the same initial state. Each round every client runs
``local_steps`` full-batch Adam steps on its own examples from the global prompt; the server
averages the clients' prompts weighted by their example counts (FedAvg).

``python -m fedbpt_cli.experiments.whitebox --train FILE ...`` runs ONE such client's round in
its own process: the experiment runner reads that process's peak RSS for the memory table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch

from fed_clients.data import LabeledTexts, load_labeled_texts
from fed_clients.inputs import EncodedSplit, encode_split, input_budget
from fed_clients.model_api import ModelService
from fed_clients.presets import ResolvedTask, resolve_task
from inference_service.backends import load_backend
from inference_service.backends.base import RowBatch
from inference_service.rows import assemble
from inference_service.scoring import Scorer
from inference_service.settings import ServiceSettings
from inference_service.tasks import CompiledTask
from protos import ModelInfo
from protos.arrays import Array

EVAL_BATCH = 256


class InProcessModel:
    """The two calls input encoding makes of the service (model info, tokenize), answered by the
    service's own Scorer in this process: white-box inputs are encoded exactly like the clients'."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    def info(self) -> ModelInfo:
        return self.scorer.model_info()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.scorer.tokenize(list(texts))


def load_scorer(settings: ServiceSettings | None = None) -> Scorer:
    settings = settings or ServiceSettings()
    backend = load_backend(settings)
    for p in backend_parameters(backend):
        p.requires_grad_(False)  # only the prompt is trained; gradients flow through the model
    return Scorer(backend, settings)


def backend_parameters(backend: object) -> list[torch.nn.Parameter]:
    modules = [getattr(backend, n) for n in ("st_model", "model") if hasattr(backend, n)]
    return [p for m in modules for p in m.parameters()]


@dataclass
class PromptModel:
    """Logits [B, C] of inputs under an additive prompt [L, hidden], differentiable in the prompt."""

    scorer: Scorer
    task: ResolvedTask
    prompt_length: int
    max_input_tokens: int
    init_text: str | None = None  # p0's tokens (None: BBT's placeholders), as projection.p0_text
    compiled: CompiledTask = field(init=False)
    anchors: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.compiled = self.scorer.tasks.get(self.task.spec)
        if self.compiled.head == "embedding":
            with torch.inference_mode():
                anchors = self.scorer.anchor_embeddings(self.compiled)
            self.anchors = anchors.clone()  # a normal tensor: autograd may save it

    @property
    def hidden(self) -> int:
        return self.scorer.info.hidden_size

    @property
    def device(self) -> torch.device:
        return self.scorer.backend.device

    def encode(self, data: LabeledTexts) -> EncodedSplit:
        api = cast(ModelService, InProcessModel(self.scorer))
        budget = input_budget(api, self.task, self.prompt_length, self.max_input_tokens)
        return encode_split(api, data, self.task, budget)

    def logits(self, input_ids: list[list[int]], prompt: torch.Tensor) -> torch.Tensor:
        backend = self.scorer.backend
        seqs = assemble(
            self.compiled,
            input_ids,
            backend.codec,
            self.prompt_length,
            self.scorer.info.max_length,
            self.init_text,
        )
        batch = RowBatch(
            token_ids=seqs.token_ids,
            prompt_start=seqs.prompt_start,
            prompt_length=self.prompt_length,
            prompt_index=[0] * len(input_ids),
            prompts=prompt.unsqueeze(0),
            prompt_mode="add",
            score_index=seqs.score_index,
            label_ids=list(self.compiled.label_ids) if self.compiled.label_ids is not None else None,
        )
        if self.anchors is None:
            return backend.label_logits(batch).to(prompt.device)
        pooled = torch.nn.functional.normalize(backend.sentence_embeddings(batch), dim=-1)
        return self.scorer.settings.embedding_logit_scale * pooled @ self.anchors.to(pooled.device).T

    def zero_prompt(self) -> torch.Tensor:
        return torch.zeros(self.prompt_length, self.hidden, device=self.device, dtype=torch.float32)

    @torch.inference_mode()
    def accuracy(self, split: EncodedSplit, prompt: torch.Tensor) -> float:
        correct = 0
        labels = torch.as_tensor(split.labels)
        for start in range(0, len(split), EVAL_BATCH):
            logits = self.logits(split.input_ids[start : start + EVAL_BATCH], prompt).float().cpu()
            correct += int((logits.argmax(-1) == labels[start : start + EVAL_BATCH]).sum())
        return correct / len(split)

    def local_round(
        self, split: EncodedSplit, prompt: torch.Tensor, steps: int, lr: float
    ) -> tuple[torch.Tensor, float]:
        """``steps`` full-batch Adam steps from ``prompt``; returns the new prompt and the last loss."""
        local = prompt.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([local], lr=lr)
        labels = torch.as_tensor(split.labels, device=self.device)
        loss_value = float("nan")
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.logits(split.input_ids, local).float(), labels)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
        return local.detach(), loss_value


def prompt_body_bytes(prompt: torch.Tensor) -> int:
    """Bytes of the JSON body that carries the prompt one way (our typed float32 array on the wire)."""
    array = Array.from_numpy(prompt.detach().cpu().numpy().astype(np.float32), "float32")
    return len(array.model_dump_json().encode())


@dataclass
class WhiteBoxRun:
    curve: list[tuple[int, float]]
    losses: list[float]
    bytes_per_direction: int
    seconds: float


def run_federation(
    model: PromptModel,
    train: Sequence[LabeledTexts],
    test: LabeledTexts,
    rounds: int,
    local_steps: int,
    lr: float,
    eval_every: int,
    seed: int,
) -> WhiteBoxRun:
    """FedAvg of soft prompts over the clients' training sets; test accuracy of the global prompt
    at state 0, every ``eval_every`` rounds and at the end."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    splits = [model.encode(t) for t in train if len(t)]
    weights = torch.tensor([len(s) for s in splits], dtype=torch.float32)
    weights = weights / weights.sum()
    test_split = model.encode(test)
    prompt = model.zero_prompt()
    curve = [(0, model.accuracy(test_split, prompt))]
    losses = []
    for r in range(rounds):
        updates, round_losses = [], []
        for split in splits:
            local, loss = model.local_round(split, prompt, local_steps, lr)
            updates.append(local)
            round_losses.append(loss)
        prompt = sum(w * u for w, u in zip(weights.tolist(), updates, strict=True))  # type: ignore[assignment]
        losses.append(float(np.average(round_losses, weights=weights.numpy())))
        state = r + 1
        if state == rounds or (eval_every > 0 and state % eval_every == 0):
            curve.append((state, model.accuracy(test_split, prompt)))
    return WhiteBoxRun(curve, losses, prompt_body_bytes(prompt), time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    """One white-box client's round in this process (for its peak RSS)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--prompt-length", type=int, required=True)
    parser.add_argument("--max-input-tokens", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args(argv)
    scorer = load_scorer()
    task = resolve_task(args.task, scorer.info.head)
    model = PromptModel(scorer, task, args.prompt_length, args.max_input_tokens)
    split = model.encode(load_labeled_texts(str(args.train)))
    _, loss = model.local_round(split, model.zero_prompt(), args.steps, args.lr)
    print(f"white-box client: {len(split)} examples, {args.steps} steps, final loss {loss:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
