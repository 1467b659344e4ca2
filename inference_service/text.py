"""Text to token ids, the same way for every backend (any Hugging Face tokenizer).

Byte-level BPE and SentencePiece tokenisers give a word another id when it follows a space than at
the start of a text. Inputs, template pieces and causal label words always follow other text in a
row, so they are tokenised *in context*: as the continuation of a fixed anchor word ("a"), whose
ids are then cut off. WordPiece tokenisers give the same ids either way.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

_ANCHOR = "a"


class TextCodec:
    """The tokenizer facts the service needs: in-context ids, special framing, placeholders."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        # Hugging Face tokenizers may re-borrow their Rust state on a call; one call at a time.
        self._lock = threading.Lock()
        self._anchor = self.encode(_ANCHOR)
        with_specials = self._call([_ANCHOR], add_special_tokens=True)[0]
        self.prefix_special, self.suffix_special = _split_framing(with_specials, self._anchor)
        self.mask_token_id: int | None = tokenizer.mask_token_id
        self.special_ids: list[int] = sorted(
            {int(i) for i in tokenizer.all_special_ids if i is not None and 0 <= int(i) < vocab_size}
        )
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        self.pad_id: int = int(pad) if pad is not None else 0
        self._init_cache: dict[str, list[int]] = {}

    def _call(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        with self._lock:
            out = self.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [[int(t) for t in ids] for ids in out]

    def encode(self, text: str) -> list[int]:
        """Plain ids of ``text``, no special tokens."""
        return self._call([text], add_special_tokens=False)[0]

    def encode_in_context(self, texts: Sequence[str], leading_space: bool = True) -> list[list[int]]:
        """Ids of each text as it reads after a word (separated by a space when ``leading_space``;
        otherwise exactly as written, own leading whitespace included)."""
        if not texts:
            return []
        sep = " " if leading_space else ""
        joined = self._call([_ANCHOR + sep + t for t in texts], add_special_tokens=False)
        n = len(self._anchor)
        out: list[list[int]] = []
        for text, ids in zip(texts, joined, strict=True):
            if ids[:n] == self._anchor:
                out.append(ids[n:])
            else:  # the text merged with the anchor word: fall back to tokenising it alone
                out.append(self.encode(text))
        return out

    def encode_inputs(self, texts: Sequence[str]) -> list[list[int]]:
        """Input texts, as /v1/tokenize returns them: stripped, tokenised as following a word."""
        stripped = [t.strip() for t in texts]
        nonempty = [t for t in stripped if t]
        encoded = iter(self.encode_in_context(nonempty))
        return [next(encoded) if t else [] for t in stripped]

    def prompt_ids(self, length: int, init_text: str | None = None) -> list[int]:
        """The ids the prompt slot holds (p0 is what the model makes of them): BBT's placeholders
        when ``init_text`` is None, else the text's ids in context, repeated or cut to ``length``."""
        if init_text is None:
            return self.placeholder_ids(length)
        ids = self._init_ids(init_text)
        return [ids[i % len(ids)] for i in range(length)]

    def _init_ids(self, text: str) -> list[int]:
        cached = self._init_cache.get(text)
        if cached is None:
            cached = [i for i in self.encode_in_context([text])[0] if i not in set(self.special_ids)]
            if not cached:
                raise ValueError(f"init_text {text!r} has no tokens besides special ones")
            if len(self._init_cache) < 64:
                self._init_cache[text] = cached
        return cached

    def placeholder_ids(self, length: int) -> list[int]:
        """BBT's placeholder tokens: ids 1000, 1001, ... skipping special ids, wrapping around."""
        specials = set(self.special_ids)
        if len(specials) >= self.vocab_size:
            raise ValueError("the vocabulary holds nothing but special tokens")
        out: list[int] = []
        k = 1000
        while len(out) < length:
            i = k % self.vocab_size
            if i not in specials:
                out.append(i)
            k += 1
        return out


def _split_framing(with_specials: list[int], plain: list[int]) -> tuple[list[int], list[int]]:
    """The special ids a tokenizer puts before and after a text ([CLS] .. [SEP], <s> .., BOS ..)."""
    n = len(plain)
    for start in range(len(with_specials) - n + 1):
        if with_specials[start : start + n] == plain:
            return with_specials[:start], with_specials[start + n :]
    return [], []
