"""The three heads against independent reference computations (full model forwards, one row at a
time, no padding), on tiny random models saved/loaded with save_pretrained/from_pretrained and on the
real MiniLM; z vs prompt_embeds; chunking and bucketing; template perturbation.

The references never read the scorer's own sequences: each row, its prompt slot, its scored position
and the label ids are built here from the model's tokenizer and the template alone, by the layout of
docs/design.md ("Sequences, per head") and ``protos.TaskSpec`` (the soft prompt right after the first
special token; the mlm head scores the ``{mask}`` position, the causal head the last token; the
embedding head pools every position but the prompt's). A scorer that put the prompt, or read the
logits, anywhere else fails them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from inference_service.backends.base import RowBatch, embedding_matrix_std, prompted_input_embeds
from inference_service.backends.transformers_backend import CausalBackend, EmbeddingBackend
from inference_service.scoring import Scorer
from protos import Array, ScoreRequest, TaskSpec, TemplatePerturbation
from protos.scoring import DEFAULT_INIT_TEXT
from tests.service.conftest import TASKS, TEXTS, Zoo, z_request

ATOL = 1e-5
# Two identical candidates in one batch go through different rows of the same matrix kernels; on CPUs
# with AVX-512/AMX kernels (MKL, oneDNN) rows differ by a few float32 ulps (measured: up to 1.9e-6 on
# logits of ~16, 1.2e-7 relative). Identical rows are therefore compared to SAME_ROW (16 ulps relative),
# never exactly (docs/development.md, "Float determinism").
SAME_ROW: dict[str, Any] = {"rtol": 2e-6, "atol": 1e-7}
Population = Callable[..., np.ndarray]
# protos.TaskSpec: "The soft prompt always sits right after the first special token ([CLS], <s>, BOS)."
PROMPT_START = 1


@dataclass(frozen=True)
class Row:
    """One model sequence as the docs define it: its ids and the position whose logits are read."""

    ids: list[int]
    scored: int  # mlm: the mask token; causal: the last token; embedding: -1 (pooled, none read)


def _tokenizer(zoo: Zoo, name: str) -> Any:
    """The model's tokenizer, loaded here from the model folder (not the scorer's codec)."""
    return AutoTokenizer.from_pretrained(str(zoo.path(name)))


def _prompt_slot_ids(tok: Any, length: int) -> list[int]:
    """p0's tokens: the default init text read after a word (a leading space), repeated or cut to
    ``length`` (docs/design.md)."""
    phrase: list[int] = tok(" " + DEFAULT_INIT_TEXT, add_special_tokens=False)["input_ids"]
    return [phrase[i % len(phrase)] for i in range(length)]


def _reference_rows(tok: Any, task: TaskSpec, head: str, texts: list[str], prompt_length: int) -> list[Row]:
    """Each input's row from the tokenizer and the template alone: the template filled with the
    input and the mask token (which absorbs the space before it), read after a word (the prompt's),
    with the tokenizer's own special framing; the prompt's tokens go right after the first special
    token."""
    rows = []
    for text in texts:
        filled = re.sub(r"\s*\{mask\}", tok.mask_token or "", task.template)
        filled = filled.replace("{input}", text.strip()).rstrip()
        whole: list[int] = tok(" " + filled)["input_ids"]
        assert whole[0] in tok.all_special_ids  # [CLS] / <s> / BOS opens the row
        ids = [whole[0], *_prompt_slot_ids(tok, prompt_length), *whole[1:]]
        if head == "mlm":
            assert ids.count(tok.mask_token_id) == 1
            scored = ids.index(tok.mask_token_id)
        else:
            scored = len(ids) - 1 if head == "causal" else -1
        rows.append(Row(ids, scored))
    return rows


def _label_ids(tok: Any, task: TaskSpec, head: str) -> list[int]:
    """mlm: each word's first token without a leading space (BBT's verbaliser); causal: the first
    token of the word as it follows the template (after a space)."""
    lead = "" if head == "mlm" else " "
    return [tok(lead + w.strip(), add_special_tokens=False)["input_ids"][0] for w in task.labels]


def _logits(scorer: Scorer, request: ScoreRequest) -> np.ndarray:
    out = scorer.score(request)
    arr: np.ndarray = out.logits.numpy()
    assert arr.shape == (request.num_prompts, request.num_inputs, len(request.task.labels))
    assert out.rows == request.num_prompts * request.num_inputs
    return arr


def _offsets(scorer: Scorer, request: ScoreRequest) -> torch.Tensor:
    assert request.projection is not None and request.z is not None
    a = scorer.projections.get(request.projection)
    z = torch.tensor(np.array(request.z.numpy()), dtype=torch.float32)
    return (z @ a).view(z.shape[0], request.projection.prompt_length, -1)


@pytest.mark.parametrize("name", ["bert", "roberta"])
@pytest.mark.parametrize("zero_bias", [True, False])
def test_mlm_matches_bbt_add_mode(zoo: Zoo, population: Population, name: str, zero_bias: bool) -> None:
    """Catches a prompt added at another slot than right after [CLS]/<s>, or logits read at another
    position than the mask (the rows here are the tokenizer's, not the scorer's)."""
    scorer = zoo.scorer(name, zero_mlm_bias=zero_bias)
    request = z_request(name, population(3, 16))
    got = _logits(scorer, request)
    offsets = _offsets(scorer, request)
    tok = _tokenizer(zoo, name)
    length = offsets.shape[1]
    rows = _reference_rows(tok, request.task, "mlm", TEXTS, length)
    label_ids = _label_ids(tok, request.task, "mlm")

    model = AutoModelForMaskedLM.from_pretrained(str(zoo.path(name))).eval()
    bias = model.get_output_embeddings().bias
    with torch.inference_mode():
        for p in range(3):

            def add(module: torch.nn.Module, args: object, out: torch.Tensor, p: int = p) -> torch.Tensor:
                out = out.clone()
                out[:, PROMPT_START : PROMPT_START + length] += offsets[p]
                return out

            handle = model.base_model.embeddings.register_forward_hook(add)
            try:
                for b, row in enumerate(rows):
                    full = model(input_ids=torch.tensor([row.ids])).logits[0, row.scored]
                    if zero_bias:
                        full = full - bias
                    np.testing.assert_allclose(got[p, b], full[label_ids].numpy(), atol=ATOL, rtol=0)
            finally:
                handle.remove()


def test_mlm_zero_shot_equals_the_plain_model(zoo: Zoo) -> None:
    """No prompt rows at all: the plain model's logits at the mask of the tokenizer's own row.
    Catches logits read at another position than the mask."""
    scorer = zoo.scorer("roberta", zero_mlm_bias=False)
    request = ScoreRequest(task=TASKS["roberta"], texts=TEXTS)
    got = _logits(scorer, request)
    tok = _tokenizer(zoo, "roberta")
    rows = _reference_rows(tok, request.task, "mlm", TEXTS, 0)
    label_ids = _label_ids(tok, request.task, "mlm")
    model = AutoModelForMaskedLM.from_pretrained(str(zoo.path("roberta"))).eval()
    with torch.inference_mode():
        for b, row in enumerate(rows):
            full = model(input_ids=torch.tensor([row.ids])).logits[0, row.scored, label_ids]
            np.testing.assert_allclose(got[0, b], full.numpy(), atol=ATOL, rtol=0)


def test_causal_matches_word_embedding_add(zoo: Zoo, population: Population) -> None:
    """Catches a prompt added anywhere but right after BOS, or logits read anywhere but the last token."""
    scorer = zoo.scorer("llama")
    request = z_request("llama", population(3, 16))
    got = _logits(scorer, request)
    offsets = _offsets(scorer, request)
    tok = _tokenizer(zoo, "llama")
    length = offsets.shape[1]
    rows = _reference_rows(tok, request.task, "causal", TEXTS, length)
    label_ids = _label_ids(tok, request.task, "causal")
    model = AutoModelForCausalLM.from_pretrained(str(zoo.path("llama"))).eval()
    with torch.inference_mode():
        for p in range(3):
            for b, row in enumerate(rows):
                emb = model.get_input_embeddings()(torch.tensor(row.ids)).clone()
                emb[PROMPT_START : PROMPT_START + length] += offsets[p]
                ref = model(inputs_embeds=emb[None]).logits[0, row.scored, label_ids]
                np.testing.assert_allclose(got[p, b], ref.numpy(), atol=ATOL, rtol=0)


def test_causal_full_route_equals_label_rows(zoo: Zoo, population: Population) -> None:
    scorer = zoo.scorer("llama")
    backend = scorer.backend
    assert isinstance(backend, CausalBackend) and not backend.full_route
    request = z_request("llama", population(2, 16))
    restricted = _logits(scorer, request)
    backend.full_route = True
    try:
        full = _logits(scorer, request)
    finally:
        backend.full_route = False
    np.testing.assert_allclose(restricted, full, atol=ATOL, rtol=0)


def _embedding_reference(
    st: SentenceTransformer, seq: list[int], offset: torch.Tensor | None, anchors: torch.Tensor
) -> np.ndarray:
    """One row through the encoder with the prompt added at the slot after [CLS], mean-pooled over
    every position but the prompt's, normalised, 20 x cosine to each anchor."""
    model: Any = st[0].auto_model
    emb = model.get_input_embeddings()(torch.tensor(seq)).clone()
    keep = torch.ones(len(seq), dtype=torch.bool)
    if offset is not None:
        emb[PROMPT_START : PROMPT_START + offset.shape[0]] += offset
        keep[PROMPT_START : PROMPT_START + offset.shape[0]] = False
    hidden = model(inputs_embeds=emb[None]).last_hidden_state[0]
    pooled = torch.nn.functional.normalize(hidden[keep].mean(0), dim=-1)
    return (20.0 * anchors @ pooled).numpy()


@pytest.mark.parametrize("name", ["st-bert", "minilm"])
def test_embedding_head_matches_sentence_transformers(zoo: Zoo, population: Population, name: str) -> None:
    """Against sentence-transformers loaded here from the model folder: catches a prompt put
    elsewhere than right after [CLS], or prompt rows pooled (or input rows left out of the pool)."""
    scorer = zoo.scorer(name)
    assert isinstance(scorer.backend, EmbeddingBackend)
    st = SentenceTransformer(str(zoo.path(name)), device="cpu").eval()
    labels = TASKS[name].labels
    anchors = torch.tensor(st.encode(labels, normalize_embeddings=True))

    # Zero-shot: exactly sentence-transformers' own encode() and cosine.
    zero = _logits(scorer, ScoreRequest(task=TASKS[name], texts=TEXTS))
    encoded = torch.tensor(st.encode(TEXTS, normalize_embeddings=True))
    np.testing.assert_allclose(zero[0], 20.0 * (encoded @ anchors.T).numpy(), atol=1e-4, rtol=0)

    request = z_request(name, population(2, 16))
    got = _logits(scorer, request)
    offsets = _offsets(scorer, request)
    rows = _reference_rows(st[0].tokenizer, request.task, "embedding", TEXTS, offsets.shape[1])
    with torch.inference_mode():
        for p in range(2):
            for b, row in enumerate(rows):
                ref = _embedding_reference(st, row.ids, offsets[p], anchors)
                np.testing.assert_allclose(got[p, b], ref, atol=1e-4, rtol=0)
    assert np.abs(got[0] - got[1]).max() > 1e-3


@pytest.mark.parametrize("name", ["bert", "roberta", "llama", "st-bert"])
def test_z_path_equals_prompt_embeds_p0_plus_az(zoo: Zoo, population: Population, name: str) -> None:
    scorer = zoo.scorer(name)
    request = z_request(name, population(3, 16))
    by_z = _logits(scorer, request)
    assert request.projection is not None
    # p0: what the model makes of the init text's tokens at the slot (the tokens from the tokenizer).
    slot = _prompt_slot_ids(_tokenizer(zoo, name), request.projection.prompt_length)
    with torch.inference_mode():
        p0 = scorer.backend.placeholder_embeddings(slot, PROMPT_START)
        embeds = (p0[None] + _offsets(scorer, request)).numpy()
    dense = ScoreRequest(prompt_embeds=Array.from_numpy(embeds), task=request.task, texts=TEXTS)
    np.testing.assert_allclose(_logits(scorer, dense), by_z, atol=ATOL, rtol=0)
    half = ScoreRequest(prompt_embeds=Array.from_numpy(embeds, "float16"), task=request.task, texts=TEXTS)
    np.testing.assert_allclose(_logits(scorer, half), by_z, atol=5e-2, rtol=0)


@pytest.mark.parametrize("name", ["bert", "roberta", "llama", "st-bert"])
def test_different_z_give_different_logits(zoo: Zoo, population: Population, name: str) -> None:
    scorer = zoo.scorer(name)
    # BBT's add mode after the LayerNorm moves tiny random models only a little: large z.
    z = population(2, 16, scale=50.0)
    got = _logits(scorer, z_request(name, z))
    assert np.abs(got[0] - got[1]).max() > 1e-4  # float32 noise here is ~1e-7
    z[1] = z[0]
    same = _logits(scorer, z_request(name, z))
    np.testing.assert_allclose(same[0], same[1], **SAME_ROW)
    zero_z = _logits(scorer, z_request(name, np.zeros((1, 16), np.float32)))
    assert np.abs(zero_z[0] - got[0]).max() > 1e-4  # z = 0: the prompt is p0 itself


@pytest.mark.parametrize("name", ["bert", "roberta", "llama", "st-bert"])
def test_chunking_and_bucketing_do_not_change_logits(zoo: Zoo, population: Population, name: str) -> None:
    request = z_request(name, population(4, 16))
    one = zoo.scorer(name, max_batch_tokens=1_000_000)
    whole = one.score(request)
    assert whole.stats is not None and whole.stats.forward_passes == 1
    for bucketing in (True, False):
        small = zoo.scorer(name, max_batch_tokens=64, length_bucketing=bucketing)
        chunked = small.score(request)
        assert chunked.stats is not None and chunked.stats.forward_passes > 4
        np.testing.assert_allclose(chunked.logits.numpy(), whole.logits.numpy(), atol=ATOL, rtol=0)
    stats = whole.stats
    assert stats.real_tokens == sum(one.prepare(request).seqs.lengths) * 4
    assert stats.padded_tokens >= stats.real_tokens


def test_bucketing_pads_less(zoo: Zoo, population: Population) -> None:
    request = z_request("llama", population(4, 16))
    bucketed = zoo.scorer("llama", max_batch_tokens=200).score(request).stats
    plain = zoo.scorer("llama", max_batch_tokens=200, length_bucketing=False).score(request).stats
    assert bucketed is not None and plain is not None
    assert bucketed.real_tokens == plain.real_tokens
    assert bucketed.padded_tokens < plain.padded_tokens


@pytest.mark.parametrize("name", ["roberta", "llama"])
def test_template_perturbation(zoo: Zoo, population: Population, name: str) -> None:
    scorer = zoo.scorer(name)
    z = population(2, 16)
    z[1] = z[0]
    clean = _logits(scorer, z_request(name, z))
    off = _logits(scorer, z_request(name, z, perturb_template=TemplatePerturbation(rate=0.0, seed=3)))
    np.testing.assert_array_equal(off, clean)
    hit = _logits(scorer, z_request(name, z, perturb_template=TemplatePerturbation(rate=0.5, seed=3)))
    again = _logits(scorer, z_request(name, z, perturb_template=TemplatePerturbation(rate=0.5, seed=3)))
    other = _logits(scorer, z_request(name, z, perturb_template=TemplatePerturbation(rate=0.5, seed=4)))
    np.testing.assert_array_equal(hit, again)
    assert np.abs(hit - clean).max() > 1e-4 and np.abs(hit - other).max() > 1e-4
    # Every candidate sees the same perturbed copy: equal up to kernel row noise, far from `other`.
    np.testing.assert_allclose(hit[0], hit[1], **SAME_ROW)


def test_texts_and_token_ids_score_the_same(zoo: Zoo, population: Population) -> None:
    scorer = zoo.scorer("roberta")
    z = population(2, 16)
    by_text = _logits(scorer, z_request("roberta", z))
    ids = scorer.tokenize(TEXTS)
    request = z_request("roberta", z)
    by_ids = _logits(scorer, request.model_copy(update={"texts": None, "input_ids": ids}))
    np.testing.assert_array_equal(by_ids, by_text)


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_per_row_prompted_embeds_helper_matches_the_causal_head(
    zoo: Zoo, population: Population, mode: str
) -> None:
    """The helper a per-sequence backend (vLLM) builds its prompt_embeds with gives the same logits,
    on rows built from the tokenizer (prompt after BOS, last token scored)."""
    scorer = zoo.scorer("llama")
    backend = scorer.backend
    assert isinstance(backend, CausalBackend)
    request = z_request("llama", population(2, 16))
    prepared = scorer.prepare(request)
    assert prepared.prompts is not None and request.projection is not None
    length = request.projection.prompt_length
    tok = _tokenizer(zoo, "llama")
    rows = _reference_rows(tok, request.task, "causal", TEXTS, length)
    prompts = prepared.prompts
    if mode == "replace":
        p0 = backend.placeholder_embeddings(_prompt_slot_ids(tok, length), PROMPT_START)
        prompts = p0[None] + prompts
    pairs = [(p, b) for p in range(2) for b in range(len(TEXTS))]
    batch = RowBatch(
        token_ids=[rows[b].ids for _, b in pairs],
        prompt_start=PROMPT_START,
        prompt_length=length,
        prompt_index=[p for p, _ in pairs],
        prompts=prompts,
        prompt_mode=mode,  # type: ignore[arg-type]
        score_index=[rows[b].scored for _, b in pairs],
        label_ids=_label_ids(tok, request.task, "causal"),
    )
    expected = _logits(scorer, request).reshape(-1, 2)
    with torch.inference_mode():
        per_row = prompted_input_embeds(batch, backend.word_embeddings)
        assert [len(e) for e in per_row] == [len(s) for s in batch.token_ids]
        for r, embeds in enumerate(per_row):
            logits = backend.model(inputs_embeds=embeds[None]).logits[0, -1, batch.label_ids]
            np.testing.assert_allclose(logits.numpy(), expected[r], atol=ATOL, rtol=0)
        np.testing.assert_allclose(backend.label_logits(batch).numpy(), expected, atol=ATOL, rtol=0)


def test_embedding_std_is_the_std_of_every_entry() -> None:
    weight = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(0)) * 0.05 + 0.01
    assert embedding_matrix_std(weight) == pytest.approx(float(weight.double().std()), rel=1e-9)
    assert embedding_matrix_std(weight, 2.0) == pytest.approx(2 * float(weight.double().std()), rel=1e-9)
