"""Tiny random models for tests and benchmarks, built from configs with real tokenizers, offline.

Each model is saved with ``save_pretrained`` and loads through the same ``from_pretrained`` path
users take. Tokenizers are trained here with the ``tokenizers`` library on a few thousand SST-2
sentences (the shared data, when present) plus a built-in seed text: WordPiece for BERT, byte-level
BPE for RoBERTa (``<s> .. </s>``) and Llama (BOS only). Weights are drawn from a fixed seed.

``fedbpt make-random-model ARCH OUT_DIR --size tiny`` builds one. This module imports only light
things at import time (the CLI imports it on every install).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer

ARCHS = ("bert", "roberta", "llama", "st-bert")
SIZES = ("tiny", "roberta-large")

# Words the test and preset templates use, so that they are whole tokens in every vocabulary.
_SEED_TEXT = (
    "a . It was bad . It was great . It was good . It was terrible . The sentiment is negative . "
    "The sentiment is positive . The news above is about world . sports . business . tech . "
    "World Sports Business Tech News : the movie is a film about the story of the characters . "
    "this is a great film and a bad movie , it is not good but funny and sad ."
)
_CORPUS_LINES = 3000


def _shared_corpus() -> Path | None:
    root = os.environ.get("FEDBPT_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    path = base / "sst2" / "train.jsonl"
    return path if path.is_file() else None


def corpus(path: Path | None = None, lines: int = _CORPUS_LINES) -> list[str]:
    """Training text for the tokenizers: the seed text (x20) and SST-2 sentences when present."""
    out = [_SEED_TEXT] * 20
    source = path or _shared_corpus()
    if source is not None:
        with source.open() as f:
            for k, line in enumerate(f):
                if k >= lines:
                    break
                text = json.loads(line).get("text") if line.strip().startswith("{") else line
                if text:
                    out.append(str(text).strip())
    return out


def _iter(texts: list[str]) -> Iterator[str]:
    yield from texts


def wordpiece_tokenizer(texts: list[str], vocab_size: int = 2000) -> Any:
    """An uncased BERT-style WordPiece tokenizer: [CLS] .. [SEP], [MASK], [PAD]=0.

    The vocabulary is the same on every run: the special tokens, every character seen (alone and
    as a ``##`` continuation), then the most frequent words, ties broken alphabetically.
    ``tokenizers``' WordPieceTrainer is not used because its vocabulary changes from run to run
    (huggingface/tokenizers#1794: ``##`` pieces get ids in hash-map order), which would give two
    builds of "the same" model different token ids.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    tokens = specials + chars + [f"##{c}" for c in chars]
    known = set(tokens)
    frequent = sorted((w for w in counts if w not in known), key=lambda w: (-counts[w], w))
    tokens += frequent[: max(0, vocab_size - len(tokens))]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(specials)  # "[MASK]" in a template stays one token, never split
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def bytelevel_tokenizer(texts: list[str], vocab_size: int, style: str) -> Any:
    """Byte-level BPE. ``roberta``: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4, ``<s> $A </s>``;
    ``llama``: <unk>=0 <s>=1 </s>=2, ``<s> $A`` (BOS only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if style == "roberta" else ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
    )
    tok.train_from_iterator(_iter(texts), trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    if style == "roberta":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", bos), ("</s>", eos)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            cls_token="<s>",
            sep_token="</s>",
            mask_token=AddedToken("<mask>", lstrip=True, special=True),
            model_max_length=512,
        )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _dims(arch: str, size: str) -> dict[str, int]:
    if size == "tiny":
        if arch == "llama":
            # head_dim 64: vLLM's CPU attention rejects 16, and the same model serves vLLM parity.
            return {"hidden": 128, "layers": 2, "heads": 2, "ffn": 256, "positions": 512}
        return {"hidden": 64, "layers": 2, "heads": 2, "ffn": 128, "positions": 512}
    if size == "roberta-large" and arch == "roberta":
        return {"hidden": 1024, "layers": 24, "heads": 16, "ffn": 4096, "positions": 512}
    raise ValueError(
        f"size {size!r} is not available for {arch!r}; sizes: tiny (all), roberta-large (roberta)"
    )


def build_random_model(
    arch: str, out_dir: Path, size: str = "tiny", seed: int = 0, corpus_path: Path | None = None
) -> Path:
    """Build ``arch`` (bert | roberta | llama | st-bert) at ``size`` into ``out_dir``; return it."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; one of {', '.join(ARCHS)}")
    import torch

    dims = _dims(arch, size)
    texts = corpus(corpus_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # before any weight is drawn: the same seed gives the same model
    model, tokenizer = _BUILDERS[arch](texts, dims, size)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _portable_tokenizer_class(out_dir)
    if arch == "st-bert":
        _write_sentence_transformers_files(out_dir, dims["hidden"])
    return out_dir


def _shape(dims: dict[str, int]) -> dict[str, Any]:
    """The transformer's size, under the names BERT, RoBERTa and Llama configs share."""
    return {
        "hidden_size": dims["hidden"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "intermediate_size": dims["ffn"],
    }


def _bert(texts: list[str], dims: dict[str, int], *, encoder_only: bool) -> tuple[Any, Any]:
    from transformers import BertConfig, BertForMaskedLM, BertModel

    tokenizer = wordpiece_tokenizer(texts)
    config = BertConfig(
        vocab_size=len(tokenizer),
        **_shape(dims),
        max_position_embeddings=dims["positions"],
        pad_token_id=tokenizer.pad_token_id,
    )
    return (BertModel(config) if encoder_only else BertForMaskedLM(config)), tokenizer


def _roberta(texts: list[str], dims: dict[str, int], size: str) -> tuple[Any, Any]:
    from transformers import RobertaConfig, RobertaForMaskedLM

    large = size == "roberta-large"
    tokenizer = bytelevel_tokenizer(texts, 8000 if large else 2000, "roberta")
    config = RobertaConfig(
        vocab_size=50265 if large else len(tokenizer),  # roberta-large's shapes, a smaller tokenizer
        **_shape(dims),
        max_position_embeddings=dims["positions"] + 2,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    return RobertaForMaskedLM(config), tokenizer


def _llama(texts: list[str], dims: dict[str, int]) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bytelevel_tokenizer(texts, 2000, "llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **_shape(dims),
        num_key_value_heads=dims["heads"],
        max_position_embeddings=dims["positions"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config), tokenizer


# arch -> (corpus, dims, size) -> (model, tokenizer), both unsaved.
_BUILDERS: dict[str, Callable[[list[str], dict[str, int], str], tuple[Any, Any]]] = {
    "bert": lambda texts, dims, _size: _bert(texts, dims, encoder_only=False),
    "st-bert": lambda texts, dims, _size: _bert(texts, dims, encoder_only=True),
    "roberta": _roberta,
    "llama": lambda texts, dims, _size: _llama(texts, dims),
}


def _portable_tokenizer_class(out_dir: Path) -> None:
    """transformers 5 records its own "TokenizersBackend" class; "PreTrainedTokenizerFast" loads the
    same tokenizer.json on transformers 4.x and 5.x alike (the vLLM environment pins another)."""
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2))


def _write_sentence_transformers_files(out_dir: Path, hidden: int) -> None:
    """The same layout as all-MiniLM-L6-v2: Transformer (root) -> mean Pooling -> Normalize."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out_dir / "modules.json").write_text(json.dumps(modules, indent=2))
    (out_dir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 256, "do_lower_case": False})
    )
    pooling = {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (out_dir / "2_Normalize").mkdir(exist_ok=True)


def make_random_model(
    arch: str = typer.Argument(..., help="bert | roberta | llama | st-bert"),
    out_dir: Path = typer.Argument(..., help="folder to write the model and tokenizer to"),
    size: str = typer.Option("tiny", help="tiny | roberta-large (roberta only)"),
    seed: int = typer.Option(0, help="seed of the random weights"),
    corpus_path: Path | None = typer.Option(
        None, "--corpus", help="JSON Lines with a text field (default: SST-2)"
    ),
) -> None:
    """Build a random model from a config, with a real tokenizer, saved with save_pretrained."""
    try:
        path = build_random_model(arch, out_dir, size=size, seed=seed, corpus_path=corpus_path)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"wrote {arch} ({size}) to {path}")
