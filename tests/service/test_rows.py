"""Backend-neutral parts: task compilation, row layout per head, chunk planning, perturbation."""

from __future__ import annotations

import pytest

from inference_service.errors import BadRequest
from inference_service.rows import Sequences, assemble, perturb_template, plan_chunks, plan_rows
from inference_service.tasks import compile_task
from inference_service.text import TextCodec
from protos import TaskSpec, TemplatePerturbation
from tests.service.conftest import Zoo


def _codec(zoo: Zoo, name: str) -> TextCodec:
    return zoo.backend(name).codec


def test_bert_rows_equal_the_tokenizers_own_reading(zoo: Zoo) -> None:
    codec = _codec(zoo, "bert")
    tok = codec.tokenizer
    task = compile_task(
        TaskSpec(template="{input} . It was {mask} .", labels=["bad", "great"]), "mlm", codec, 512
    )
    text = "a great movie"
    seqs = assemble(task, codec.encode_inputs([text]), codec, 4, 512)
    whole = tok(f"{text} . It was [MASK] .")["input_ids"]  # [CLS] ... [MASK] . [SEP]
    placeholders = [1000, 1001, 1002, 1003]  # BBT's placeholder ids (no special id among them here)
    assert seqs.token_ids[0] == [whole[0], *placeholders, *whole[1:]]
    assert seqs.prompt_start == 1
    assert seqs.token_ids[0][seqs.score_index[0]] == tok.mask_token_id
    start, end = seqs.input_spans[0]
    assert seqs.token_ids[0][start:end] == tok(text, add_special_tokens=False)["input_ids"]
    assert task.label_ids == (tok.convert_tokens_to_ids("bad"), tok.convert_tokens_to_ids("great"))


def test_roberta_pieces_and_labels_follow_bbt(zoo: Zoo) -> None:
    codec = _codec(zoo, "roberta")
    tok = codec.tokenizer
    task = compile_task(
        TaskSpec(template="{input} . It was {mask} .", labels=["bad", "great"]), "mlm", codec, 512
    )
    seqs = assemble(task, codec.encode_inputs(["a great movie"]), codec, 3, 512)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = [tok.bos_token_id, 1000, 1001, 1002, *enc(" a great movie . It was")]
    expected += [tok.mask_token_id, *enc(" ."), tok.eos_token_id]
    assert seqs.token_ids[0] == expected
    # Label words: the first token without a leading space (BBT's verbaliser), not "Ġbad".
    assert task.label_ids == (enc("bad")[0], enc("great")[0])
    assert tok.convert_ids_to_tokens(list(task.label_ids))[0] == "bad"


def test_causal_rows_end_at_the_answer_and_labels_follow_a_space(zoo: Zoo) -> None:
    codec = _codec(zoo, "llama")
    tok = codec.tokenizer
    spec = TaskSpec(template="Review: {input} . The sentiment is {mask}", labels=["negative", "positive"])
    task = compile_task(spec, "causal", codec, 512)
    seqs = assemble(task, codec.encode_inputs(["a great movie"]), codec, 2, 512)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert seqs.token_ids[0] == [
        tok.bos_token_id,
        1000,
        1001,
        *enc(" Review: a great movie . The sentiment is"),
    ]
    assert seqs.score_index[0] == len(seqs.token_ids[0]) - 1
    assert task.label_ids == (enc(" negative")[0], enc(" positive")[0])


def test_embedding_rows_and_anchors(zoo: Zoo) -> None:
    codec = _codec(zoo, "st-bert")
    tok = codec.tokenizer
    task = compile_task(
        TaskSpec(template="{input}", labels=["this is bad", "this is great"]), "embedding", codec, 256
    )
    seqs = assemble(task, codec.encode_inputs(["a great movie"]), codec, 2, 256)
    whole = tok("a great movie")["input_ids"]
    assert seqs.token_ids[0] == [whole[0], 1000, 1001, *whole[1:]]
    assert task.anchor_ids == (
        tuple(tok("this is bad")["input_ids"]),
        tuple(tok("this is great")["input_ids"]),
    )


@pytest.mark.parametrize(
    ("head", "template", "labels", "message"),
    [
        ("mlm", "{input} . It was good .", ["bad", "great"], "has none"),
        ("causal", "{input} . It was {mask} .", ["bad", "great"], "must end the template"),
        ("embedding", "{input} {mask}", ["bad", "great"], "remove {mask}"),
        ("causal", "{input} . It was", ["bad", "   ."], None),
    ],
)
def test_template_rules_per_head(
    zoo: Zoo, head: str, template: str, labels: list[str], message: str | None
) -> None:
    codec = _codec(zoo, "bert")
    spec = TaskSpec(template=template, labels=labels)
    if message is None:
        compile_task(spec, head, codec, 512)  # type: ignore[arg-type]
        return
    with pytest.raises(BadRequest, match=message.replace("{", r"\{").replace("}", r"\}")):
        compile_task(spec, head, codec, 512)  # type: ignore[arg-type]


def test_a_label_that_vanishes_is_refused(zoo: Zoo) -> None:
    codec = _codec(zoo, "bert")
    with pytest.raises(BadRequest, match="tokenises to no tokens"):
        # A control character is dropped by BERT's normaliser: nothing is left.
        compile_task(TaskSpec(template="{input} {mask}", labels=["bad", "\u0007"]), "mlm", codec, 512)
    # Two words sharing a first token: test_head_refusals_name_the_labels_the_token_and_the_limit.


def test_head_refusals_name_the_labels_the_token_and_the_limit(zoo: Zoo) -> None:
    """The exact refusals of each head, with ids and lengths computed from the tokenizer here.
    Fails against a copy that names the colliding word's second token, loses the first word's
    name, or drops the reason (heads `_first_ids` 15-18); that lets a model without a mask token
    serve the mlm head or says so vaguely (`MaskedLM.scored_template` 4-6); that refuses an anchor
    of exactly max_length tokens, accepts a longer one or says nothing of an empty one
    (`SentenceEmbedding.labels` 5, 7, 8)."""
    bert = _codec(zoo, "bert")
    great = bert.tokenizer.convert_tokens_to_ids("great")
    with pytest.raises(BadRequest) as caught:
        compile_task(TaskSpec(template="{input} {mask}", labels=["great", "greatness"]), "mlm", bert, 512)
    assert str(caught.value) == (
        f"label words 'great' and 'greatness' both start with token id {great}; their logits would be identical"
    )
    llama = _codec(zoo, "llama")
    assert llama.tokenizer.mask_token is None
    with pytest.raises(BadRequest) as caught:
        compile_task(TaskSpec(template="{input} {mask}", labels=["bad", "great"]), "mlm", llama, 512)
    assert str(caught.value) == "this model's tokenizer has no mask token; it cannot serve the mlm head"

    st = _codec(zoo, "st-bert")
    anchor = "this is great"
    n = len(st.tokenizer(anchor)["input_ids"])  # [CLS] this is great [SEP]
    spec = TaskSpec(template="{input}", labels=["bad", anchor])  # [CLS] bad [SEP] fits either way
    task = compile_task(spec, "embedding", st, n)  # exactly max_length: fits
    assert task.anchor_ids is not None and len(task.anchor_ids[1]) == n
    with pytest.raises(BadRequest) as caught:
        compile_task(spec, "embedding", st, n - 1)
    assert str(caught.value) == f"label anchor {anchor!r} is {n} tokens; the model's max_length is {n - 1}"
    with pytest.raises(BadRequest) as caught:
        compile_task(TaskSpec(template="{input}", labels=["bad", "\u0007"]), "embedding", st, 512)
    assert str(caught.value) == "label anchor '\\x07' tokenises to no tokens"


def test_too_long_says_by_how_much(zoo: Zoo) -> None:
    codec = _codec(zoo, "bert")
    task = compile_task(TaskSpec(template="{input} {mask}", labels=["bad", "great"]), "mlm", codec, 512)
    inputs = [[7] * 10, [7] * 40]
    seqs = assemble(task, inputs, codec, 5, 48)  # 1 + 5 + 10 + 1 + 1 = 18 tokens: fine
    assert seqs.lengths[0] == 18
    with pytest.raises(BadRequest, match=r"input 1, is 48 tokens.*shorten it by 8 tokens"):
        assemble(task, inputs, codec, 5, 40)


def test_too_long_names_the_longest_of_several_and_counts_its_tokens(zoo: Zoo) -> None:
    """Two rows over the limit, the longer one not first: the error names the longest and splits
    its length into input, prompt and template tokens. Fails against a copy that reports the first
    (or shortest) offending row, or that miscounts the template tokens (mutants assemble 51-58)."""
    codec = _codec(zoo, "bert")
    task = compile_task(TaskSpec(template="{input} {mask}", labels=["bad", "great"]), "mlm", codec, 512)
    # [CLS] + 5 prompt + input + [MASK] + [SEP]: 18, 48, 44 tokens. The longest is not the last
    # offender, so "the offender with the highest index" (max over (b, n) pairs) is caught too.
    inputs = [[7] * 10, [7] * 40, [7] * 36]
    with pytest.raises(BadRequest) as caught:
        assemble(task, inputs, codec, 5, 40)
    assert str(caught.value) == (
        "2 input(s) make sequences longer than the model's max_length 40: the longest, input 1, is 48 "
        "tokens (40 input tokens, 5 prompt rows, 3 template and special tokens); shorten it by 8 tokens"
    )


def test_plan_rows_fills_a_chunk_exactly_to_the_budget() -> None:
    """A chunk may use the whole budget: rows x longest == max_batch_tokens still fits. Fails
    against a copy that splits at the budget itself (``>=``) or forgets the chunk's longest row."""
    assert plan_rows([8] * 8, 32) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # Unsorted: the longest row comes first and bounds the later, shorter ones (3 x 8 = 24).
    assert plan_rows([8, 4, 4, 4], 24, bucketing=False) == [[0, 1, 2], [3]]
    # A longer row joining a chunk of short ones re-prices the whole chunk (3 x 8 > 20).
    assert plan_rows([4, 4, 8, 4], 20, bucketing=False) == [[0, 1], [2, 3]]


def test_plan_chunks_covers_every_row_once_within_budget() -> None:
    lengths = [5, 30, 7, 30, 12, 3]
    for bucketing in (True, False):
        chunks = plan_chunks(lengths, num_prompts=4, max_batch_tokens=64, bucketing=bucketing)
        flat = sorted(r for c in chunks for r in c)
        assert flat == list(range(24))
        for chunk in chunks:
            longest = max(lengths[r % 6] for r in chunk)
            assert len(chunk) * longest <= 64 or len(chunk) == 1
    bucketed = plan_chunks(lengths, 4, 64, True)
    plain = plan_chunks(lengths, 4, 64, False)
    padded = lambda cs: sum(len(c) * max(lengths[r % 6] for r in c) for c in cs)  # noqa: E731
    assert padded(bucketed) < padded(plain)
    # A row longer than the budget still goes through, alone.
    assert plan_chunks([100], 2, 50) == [[0], [1]]


def test_plan_chunks_keeps_every_candidate_of_an_input_in_one_pass() -> None:
    """Rows of equal length are ordered input first, then candidate: when a chunk boundary falls
    among them, all P candidates of one input still share a forward pass, so the candidates CMA-ES
    ranks on that input differ by their prompts alone, not by how the kernels tiled another batch
    (docs/development.md, "Float determinism"). Fails against a copy ordered by row index (mutants
    plan_chunks 14, 16)."""
    # B = 2 inputs of 4 tokens, P = 3 candidates, room for 3 rows per pass: rows r = p * B + b.
    assert plan_chunks([4, 4], num_prompts=3, max_batch_tokens=12) == [[0, 2, 4], [1, 3, 5]]


def test_template_perturbation_is_seeded_per_input_and_spares_the_input(zoo: Zoo) -> None:
    codec = _codec(zoo, "bert")
    task = compile_task(
        TaskSpec(template="{input} . It was {mask} .", labels=["bad", "great"]), "mlm", codec, 512
    )
    inputs = codec.encode_inputs(["a great movie", "a bad one"])

    def perturbed(rate: float, seed: int) -> list[list[int]]:
        seqs = assemble(task, inputs, codec, 8, 512)
        perturb_template(seqs, TemplatePerturbation(rate=rate, seed=seed), codec.vocab_size)
        return seqs.token_ids

    clean = assemble(task, inputs, codec, 8, 512)
    assert perturbed(0.0, 1) == clean.token_ids
    a, b, c = perturbed(0.6, 1), perturbed(0.6, 1), perturbed(0.6, 2)
    assert a == b and a != c
    for seq, ref, (start, end) in zip(a, clean.token_ids, clean.input_spans, strict=True):
        assert seq[start:end] == ref[start:end]
        changed = sum(x != y for x, y in zip(seq, ref, strict=True))
        assert changed >= 3  # ~60% of 13 template/prompt/special positions


def test_template_perturbation_of_row_b_draws_from_seed_and_b_alone(zoo: Zoo) -> None:
    """The wire promise of ``TemplatePerturbation``: row b draws from (seed, b) and nothing else, so a
    client that splits B inputs over several calls (offsetting the seed) reproduces its copy. Catches
    a draw seeded per call (identical inputs get identical copies) and one stream for the whole call
    (row b's copy then depends on the rows before it)."""
    codec = _codec(zoo, "bert")
    task = compile_task(
        TaskSpec(template="{input} . It was {mask} .", labels=["bad", "great"]), "mlm", codec, 512
    )

    def perturbed(texts: list[str]) -> list[list[int]]:
        seqs = assemble(task, codec.encode_inputs(texts), codec, 8, 512)
        perturb_template(seqs, TemplatePerturbation(rate=0.6, seed=5), codec.vocab_size)
        return seqs.token_ids

    movie = "a great movie"
    twice = perturbed([movie, movie])
    assert twice[0] != twice[1]  # b enters the draw
    short = perturbed(["bad", movie])
    long = perturbed(["the story of the characters is funny and sad at the same time", movie])
    assert short[1] == long[1] == twice[1]  # row 1 does not depend on row 0
    assert perturbed([movie]) == twice[:1]  # nor row 0 on the rows after it


def test_init_text_fills_the_prompt_slot_with_its_own_tokens(zoo: Zoo) -> None:
    """p0 from a text: the slot holds the text's tokens as the tokenizer reads them after a word
    (computed here from the tokenizer alone), repeated to L, or cut to L."""
    codec = _codec(zoo, "roberta")
    tok = codec.tokenizer
    task = compile_task(TaskSpec(template=". {input} {mask} .", labels=["bad", "great"]), "mlm", codec, 512)
    phrase = tok(" Here is", add_special_tokens=False)["input_ids"]  # in context: after a space
    assert len(phrase) >= 2
    inputs = codec.encode_inputs(["a great movie"])
    n = len(phrase) + 2
    long = assemble(task, inputs, codec, n, 512, init_text="Here is")
    assert long.token_ids[0][1 : 1 + n] == [*phrase, *phrase[:2]]
    short = assemble(task, inputs, codec, 1, 512, init_text="Here is")
    assert short.token_ids[0][1:2] == phrase[:1]
    bbt = assemble(task, inputs, codec, 2, 512, init_text=None)
    assert bbt.token_ids[0][1:3] == [1000, 1001]
    # Everything after the slot is the same whatever p0 is.
    assert long.token_ids[0][1 + n :] == bbt.token_ids[0][3:]


def test_init_text_without_tokens_is_a_bad_request(zoo: Zoo) -> None:
    codec = _codec(zoo, "bert")
    task = compile_task(TaskSpec(template="{input} {mask}", labels=["bad", "great"]), "mlm", codec, 512)
    with pytest.raises(BadRequest, match="init_text"):
        assemble(task, codec.encode_inputs(["a movie"]), codec, 3, 512, init_text="   ")


def test_template_perturbation_draws_every_vocabulary_id_and_spares_the_input() -> None:
    """At rate 1 every non-input position becomes an integer id drawn uniformly from the whole
    vocabulary (id 0 included); the input's own ids (the client perturbs those) stay as they are."""
    n, span = 3000, (100, 200)
    seqs = Sequences([[7] * n], prompt_start=1, prompt_length=4, score_index=[n - 1], input_spans=[span])
    perturb_template(seqs, TemplatePerturbation(rate=1.0, seed=11), vocab_size=5)
    out = seqs.token_ids[0]
    assert all(type(t) is int for t in out)
    assert out[span[0] : span[1]] == [7] * (span[1] - span[0])
    outside = out[: span[0]] + out[span[1] :]
    assert set(outside) == {0, 1, 2, 3, 4}
