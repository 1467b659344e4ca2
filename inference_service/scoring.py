"""Backend-neutral scoring: one ``ScoreRequest`` (P candidates x B inputs) -> logits [P, B, C].

``prepare`` checks the request against the model (every refusal a BadRequest saying what was
wrong), compiles the task, builds the B sequences once, computes the P prompts (A.z for the whole
population in one matmul, or the given prompt_embeds) and plans the forward passes (length
buckets, token budget). ``run`` feeds the chunks to the backend and puts the logits back in
[P, B, C] order. The scheduler calls both in its worker thread.

``score_many`` is cross-request batching: requests queued together (several clients) that share a
task and prompt layout have their rows planned into one set of forward passes, so small requests
fill the token budget together; each still gets exactly its own logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from inference_service.backends.base import Backend, PromptMode, RowBatch
from inference_service.errors import BadRequest
from inference_service.numeric import NonFiniteLogits, check_logits, check_prompt, check_scale, check_z
from inference_service.projection import ProjectionCache, projection_scale, prompt_offsets
from inference_service.rows import Sequences, assemble, perturb_template, plan_chunks, plan_rows
from inference_service.settings import ServiceSettings
from inference_service.tasks import CompiledTask, TaskCache
from protos.arrays import Array
from protos.scoring import ModelInfo, ScoreRequest, ScoreResponse, ScoreStats

CPU_BATCH_TOKENS = 16_384
GPU_BATCH_TOKENS = 131_072


@dataclass
class PreparedScore:
    """A checked request, ready for the model: sequences, prompts and the plan of forward passes."""

    task: CompiledTask
    seqs: Sequences
    prompts: torch.Tensor | None  # [P, L, hidden] float32 on the model's device
    prompt_mode: PromptMode
    num_prompts: int
    num_inputs: int
    chunks: list[list[int]]
    prepare_seconds: float

    @property
    def rows(self) -> int:
        return self.num_prompts * self.num_inputs


class Scorer:
    """Scores requests with one backend; holds the task and projection caches."""

    def __init__(
        self,
        backend: Backend,
        settings: ServiceSettings,
        on_forward: Callable[[int, int], None] | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.info = backend.description
        default_budget = CPU_BATCH_TOKENS if backend.device.type == "cpu" else GPU_BATCH_TOKENS
        self.max_batch_tokens = settings.max_batch_tokens or backend.preferred_batch_tokens or default_budget
        self.bucketing = settings.length_bucketing
        self.max_rows = settings.max_rows
        self.tasks = TaskCache(backend.codec, self.info.head, self.info.max_length)
        self.projections = ProjectionCache(
            self.info.hidden_size, backend.embedding_std(), backend.device, settings.projection_cache_size
        )
        # Called after every forward pass with (rows, padded tokens): metrics.
        self.on_forward = on_forward

    # ----- what the service tells -----
    def model_info(self) -> ModelInfo:
        codec = self.backend.codec
        return ModelInfo(
            model_id=self.info.model_id,
            head=self.info.head,
            hidden_size=self.info.hidden_size,
            vocab_size=self.info.vocab_size,
            max_length=self.info.max_length,
            mask_token_id=codec.mask_token_id,
            special_token_ids=codec.special_ids,
            backend=self.info.backend,
            dtype=self.info.dtype,
            max_rows=self.max_rows,
            input_handles=self.settings.input_cache_bytes > 0,
        )

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.backend.codec.encode_inputs(texts)

    # ----- scoring -----
    def score(self, request: ScoreRequest) -> ScoreResponse:
        return self.run(self.prepare(request))

    def prepare(self, request: ScoreRequest) -> PreparedScore:
        start = time.perf_counter()
        num_prompts, num_inputs = request.num_prompts, request.num_inputs
        if num_prompts * num_inputs > self.max_rows:
            raise BadRequest(
                f"P x B = {num_prompts} x {num_inputs} = {num_prompts * num_inputs} rows; this service "
                f"scores at most {self.max_rows} rows per call (split the inputs)"
            )
        task = self.tasks.get(request.task)
        if request.input_ids is not None:
            inputs = request.input_ids
            self._check_vocab(inputs)
        else:
            inputs = self.tokenize(request.texts or [])

        # Sequences first: a prompt too long for the model is refused before any A is drawn.
        init_text = request.projection.p0_text if request.projection is not None else None
        seqs = assemble(
            task, inputs, self.backend.codec, self._prompt_length(request), self.info.max_length, init_text
        )
        with torch.inference_mode():
            prompts, mode = self._prompts(request)
        if request.perturb_template is not None:
            perturb_template(seqs, request.perturb_template, self.info.vocab_size)
        chunks = plan_chunks(seqs.lengths, num_prompts, self.max_batch_tokens, self.bucketing)
        return PreparedScore(
            task, seqs, prompts, mode, num_prompts, num_inputs, chunks, time.perf_counter() - start
        )

    def _check_vocab(self, inputs: list[list[int]]) -> None:
        vocab = self.info.vocab_size
        for b, ids in enumerate(inputs):
            if min(ids) < 0 or max(ids) >= vocab:
                i, v = next((i, v) for i, v in enumerate(ids) if v < 0 or v >= vocab)
                raise BadRequest(f"input_ids[{b}][{i}] = {v} is outside the vocabulary [0, {vocab})")

    def _prompt_length(self, request: ScoreRequest) -> int:
        if request.projection is not None:
            return request.projection.prompt_length
        if request.prompt_embeds is not None:
            return request.prompt_embeds.shape[1]
        return 0

    def _prompts(self, request: ScoreRequest) -> tuple[torch.Tensor | None, PromptMode]:
        hidden = self.info.hidden_size
        if request.z is not None and request.projection is not None:
            spec = request.projection
            nbytes = spec.intrinsic_dim * spec.prompt_length * hidden * 4
            if nbytes > self.settings.max_projection_bytes:
                raise BadRequest(
                    f"the projection A would be intrinsic_dim x prompt_length x hidden = {spec.intrinsic_dim} x "
                    f"{spec.prompt_length} x {hidden} float32 = {nbytes} bytes; this service allows "
                    f"{self.settings.max_projection_bytes}"
                )
            raw_z = request.z.numpy()
            check_z(raw_z)
            check_scale(projection_scale(spec, self.projections.embedding_std), spec.sigma0, spec.alpha)
            a = self.projections.get(spec)
            z = torch.from_numpy(np.array(raw_z, dtype=np.float32))
            offsets = prompt_offsets(z, a, spec.prompt_length, hidden)
            check_prompt(
                offsets, "A.z (the projection times z)", "lower z or projection.alpha, or raise sigma0"
            )
            return offsets, "add"
        if request.prompt_embeds is not None:
            shape = request.prompt_embeds.shape
            if shape[2] != hidden:
                raise BadRequest(
                    f"prompt_embeds has hidden size {shape[2]}; this model's hidden size is {hidden} "
                    f"(shape must be [P, L, {hidden}])"
                )
            raw = request.prompt_embeds.numpy()
            check_prompt(raw, "prompt_embeds", "send embeddings of the model's own scale")
            embeds = np.array(raw, dtype=np.float32)
            return torch.from_numpy(embeds).to(self.backend.device), "replace"
        return None, "add"

    def run(self, prepared: PreparedScore) -> ScoreResponse:
        answer = self.run_many([prepared])[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def score_many(self, requests: list[ScoreRequest]) -> list[ScoreResponse | Exception]:
        """Score several requests, merging the forward passes of those that can share them; a
        request's own error (a BadRequest, say) is its answer and does not touch the others."""
        answers: list[ScoreResponse | Exception | None] = [None] * len(requests)
        groups: dict[tuple[object, ...], list[tuple[int, PreparedScore]]] = {}
        for i, request in enumerate(requests):
            try:
                prepared = self.prepare(request)
            except Exception as exc:
                answers[i] = exc
                continue
            groups.setdefault(_merge_key(prepared), []).append((i, prepared))
        for members in groups.values():
            try:
                results: list[ScoreResponse | Exception] = list(self.run_many([p for _, p in members]))
            except Exception as exc:  # e.g. out of memory: every request of the group gets it
                results = [exc] * len(members)
            for (i, _), result in zip(members, results, strict=True):
                answers[i] = result
        return [a if a is not None else RuntimeError("not scored") for a in answers]

    def run_many(self, group: list[PreparedScore]) -> list[ScoreResponse | Exception]:
        """Run requests of one merge key (same task and prompt layout) in shared forward passes; a
        request whose logits are not all finite gets a NonFiniteLogits (422) as its answer."""
        start = time.perf_counter()
        # Global row g belongs to request owner[g], its row local[g] (= p * B + b).
        owner = [k for k, p in enumerate(group) for _ in range(p.rows)]
        local = [r for p in group for r in range(p.rows)]
        if len(group) == 1:
            chunks = group[0].chunks
        else:
            lengths = [
                group[k].seqs.lengths[r % group[k].num_inputs] for k, r in zip(owner, local, strict=True)
            ]
            chunks = plan_rows(lengths, self.max_batch_tokens, self.bucketing)
        outs, padded = self._forward_rows(group, chunks, owner, local)
        seconds = time.perf_counter() - start
        return [
            self._answer(p, out, len(chunks), padded, seconds) for p, out in zip(group, outs, strict=True)
        ]

    def _forward_rows(
        self, group: list[PreparedScore], chunks: list[list[int]], owner: list[int], local: list[int]
    ) -> tuple[list[torch.Tensor], int]:
        """The group's logits, one tensor per request, computed chunk by chunk; and the padded
        token count of all the chunks' batches."""
        first = group[0]
        task = first.task
        base = np.cumsum([0] + [p.num_prompts for p in group])
        prompts = first.prompts
        if prompts is not None and len(group) > 1:  # the merge key makes them all present
            prompts = torch.cat([p.prompts for p in group if p.prompts is not None])
        outs = [torch.empty(p.rows, task.num_labels, dtype=torch.float32) for p in group]
        padded = 0
        with torch.inference_mode():
            for chunk in chunks:
                rows = [(group[owner[g]], local[g], owner[g]) for g in chunk]
                batch = RowBatch(
                    token_ids=[p.seqs.token_ids[r % p.num_inputs] for p, r, _ in rows],
                    prompt_start=first.seqs.prompt_start,
                    prompt_length=first.seqs.prompt_length,
                    prompt_index=[int(base[k]) + r // p.num_inputs for p, r, k in rows],
                    prompts=prompts,
                    prompt_mode=first.prompt_mode,
                    score_index=[p.seqs.score_index[r % p.num_inputs] for p, r, _ in rows],
                    label_ids=list(task.label_ids) if task.label_ids is not None else None,
                )
                logits = self.logits(batch, task)
                for i, (_, r, k) in enumerate(rows):
                    outs[k][r] = logits[i]
                chunk_padded = len(batch) * batch.longest
                padded += chunk_padded
                if self.on_forward is not None:
                    self.on_forward(len(batch), chunk_padded)
        return outs, padded

    @staticmethod
    def _answer(
        p: PreparedScore, out: torch.Tensor, passes: int, padded: int, seconds: float
    ) -> ScoreResponse | Exception:
        """One request's response from its rows of the group's logits (a NonFiniteLogits if any
        is not finite); the passes and padded tokens are the group's, shared."""
        num_labels = p.task.num_labels
        stats = ScoreStats(
            forward_passes=passes,
            real_tokens=sum(p.seqs.lengths) * p.num_prompts,
            padded_tokens=padded,
            seconds=p.prepare_seconds + seconds,
        )
        logits_np = out.view(p.num_prompts, p.num_inputs, num_labels).numpy()
        try:
            check_logits(logits_np)
        except NonFiniteLogits as exc:
            return exc
        return ScoreResponse(logits=Array.from_numpy(logits_np, "float32"), rows=p.rows, stats=stats)

    def logits(self, batch: RowBatch, task: CompiledTask) -> torch.Tensor:
        if task.rules.reads_label_logits:
            return self.backend.label_logits(batch)
        anchors = self.anchor_embeddings(task)
        pooled = torch.nn.functional.normalize(self.backend.sentence_embeddings(batch), dim=-1)
        cos = pooled @ anchors.to(pooled.device).T
        return (self.settings.embedding_logit_scale * cos).float().cpu()

    def anchor_embeddings(self, task: CompiledTask) -> torch.Tensor:
        """The label anchors' embeddings (no prompt), normalised, computed once per task."""
        cached = task.cache.get("anchors")
        if cached is None:
            assert task.anchor_ids is not None
            rows = [list(r) for r in task.anchor_ids]
            batch = RowBatch(
                token_ids=rows,
                prompt_start=len(self.backend.codec.prefix_special),
                prompt_length=0,
                prompt_index=[0] * len(rows),
                prompts=None,
                prompt_mode="add",
                score_index=[0] * len(rows),
                label_ids=None,
            )
            cached = torch.nn.functional.normalize(self.backend.sentence_embeddings(batch), dim=-1)
            task.cache["anchors"] = cached
        return cached


def _merge_key(prepared: PreparedScore) -> tuple[object, ...]:
    """Requests with equal keys can share forward passes: one compiled task (the same label ids
    or anchors), the prompt slot at the same place, prompts added (or put) the same way."""
    seqs = prepared.seqs
    return (
        id(prepared.task),
        seqs.prompt_start,
        seqs.prompt_length,
        prepared.prompt_mode,
        prepared.prompts is None,
    )
