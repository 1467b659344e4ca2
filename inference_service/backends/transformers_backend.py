"""The transformers backend: the three heads (mlm, causal, embedding) on CPU or GPU.

Injection points (docs/design.md): ``mlm`` adds A.z to the embedding layer's *output* (after its
LayerNorm, BBT's "add" mode) through a forward hook; ``causal`` and ``embedding`` add it to the word
embeddings and feed ``inputs_embeds``. ``prompt_embeds`` replace the prompt rows at the same point.
No full-vocabulary logits are ever built: the mlm head runs its transform on the mask rows only and
multiplies by the label rows of the decoder; the causal head does the same with the last token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from inference_service.backends.base import (
    Backend,
    ModelDescription,
    RowBatch,
    embedding_matrix_std,
    inject_prompts,
)
from inference_service.settings import HeadName, ServiceSettings
from inference_service.text import TextCodec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """float32 on CPU; bfloat16 (float16 where bf16 is missing) on GPU unless told otherwise."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _load_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # transformers 4.56 renamed torch_dtype to dtype.
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _position_limit(config: Any, tokenizer: Any) -> int:
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        # RoBERTa-style embeddings start positions after padding_idx: 514 rows serve 512 tokens.
        if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "data2vec-text"):
            positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
        limits.append(positions)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    return min(limits) if limits else 512


class _HFBackend(Backend):
    """What the three heads share: the tokenizer, the word embeddings, device and dtype."""

    def __init__(
        self,
        head: HeadName,
        model_id: str,
        tokenizer: Any,
        word_embeddings: Any,
        model_max_length: int,
        settings: ServiceSettings,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        weight: torch.Tensor = word_embeddings.weight
        vocab_size, hidden_size = int(weight.shape[0]), int(weight.shape[1])
        self.word_embeddings: Any = word_embeddings
        self.device = device
        self.dtype = dtype
        self.codec = TextCodec(tokenizer, vocab_size)
        max_length = (
            model_max_length if settings.max_length is None else min(settings.max_length, model_max_length)
        )
        self.description = ModelDescription(
            model_id=model_id,
            head=head,
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            max_length=max_length,
            dtype=_dtype_name(dtype),
            device=str(device),
            backend="transformers",
        )
        self._std: float | None = None

    def embedding_std(self) -> float:
        if self._std is None:
            # Scaled embeddings (Gemma) multiply the table inside the module: A.z must match that scale.
            scale = getattr(self.word_embeddings, "embed_scale", None)
            self._std = embedding_matrix_std(self.word_embeddings.weight, scale)
        return self._std

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.word_embeddings(ids)
        return out

    def _tensors(self, batch: RowBatch, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask, offset = batch.padded("left" if side == "left" else "right", self.codec.pad_id)
        return (
            torch.from_numpy(ids).to(self.device),
            torch.from_numpy(mask).to(self.device),
            torch.from_numpy(offset).to(self.device),
        )


class _HeadInput(Exception):
    """Carries the input of the MLM decoder out of the head (see ``MlmBackend._transform``)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__("mlm head input captured")
        self.value = value


def _raise_input(module: nn.Module, args: tuple[Any, ...]) -> None:
    raise _HeadInput(args[0])


class MlmBackend(_HFBackend):
    """RoBERTa/BERT masked LMs, BBT's add mode: logits of the label words at the mask."""

    def __init__(self, model: Any, tokenizer: Any, settings: ServiceSettings, model_id: str) -> None:
        base = model.base_model
        embeddings = getattr(base, "embeddings", None)
        head = getattr(model, "lm_head", None)
        if head is None:
            head = getattr(model, "cls", None)
        decoder = model.get_output_embeddings()
        if embeddings is None or head is None or not isinstance(decoder, nn.Linear):
            raise ValueError(
                f"{type(model).__name__} is not a BERT/RoBERTa-style masked LM "
                "(needs base_model.embeddings, an lm_head or cls head and a linear decoder)"
            )
        param = next(model.parameters())
        super().__init__(
            "mlm",
            model_id,
            tokenizer,
            base.get_input_embeddings(),
            _position_limit(model.config, tokenizer),
            settings,
            param.device,
            param.dtype,
        )
        self.model = model
        self.base = base
        self.embeddings = embeddings
        self.head_module = head
        self.decoder = decoder
        self.use_bias = not settings.zero_mlm_bias and decoder.bias is not None

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        """The head's transform (dense, activation, LayerNorm) on [N, H] rows, without the decoder:
        a pre-hook on the decoder hands its input out, so no vocabulary-wide product is computed."""
        handle = self.decoder.register_forward_pre_hook(_raise_input)
        try:
            self.head_module(x)
        except _HeadInput as captured:
            return captured.value
        finally:
            handle.remove()
        raise RuntimeError("the MLM head returned without calling its decoder")

    def label_logits(self, batch: RowBatch) -> torch.Tensor:
        assert batch.label_ids is not None
        ids, mask, _ = self._tensors(batch, "right")

        def add_prompt(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            # Right padding keeps the prompt slot at the same columns in every row.
            return inject_prompts(output, batch)

        handle = self.embeddings.register_forward_hook(add_prompt)
        try:
            hidden = self.base(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            handle.remove()
        rows = torch.arange(len(batch), device=self.device)
        at_mask = hidden[rows, torch.as_tensor(batch.score_index, device=self.device)]
        x = self._transform(at_mask)
        label_ids = torch.as_tensor(batch.label_ids, device=self.device)
        logits = x @ self.decoder.weight.index_select(0, label_ids).T
        if self.use_bias:
            assert self.decoder.bias is not None
            logits = logits + self.decoder.bias.index_select(0, label_ids)
        return logits.float().cpu()

    @torch.inference_mode()
    def placeholder_embeddings(self, ids: list[int], prompt_start: int) -> torch.Tensor:
        seq = [*self.codec.prefix_special, *ids]
        assert len(self.codec.prefix_special) == prompt_start
        out = self.embeddings(input_ids=torch.tensor([seq], device=self.device))
        return out[0, prompt_start : prompt_start + len(ids)].float()


class CausalBackend(_HFBackend):
    """Causal LMs (BBT's GPT-2 recipe): A.z added to the word embeddings, left padding with
    explicit position ids, logits of the label words at the last token."""

    def __init__(self, model: Any, tokenizer: Any, settings: ServiceSettings, model_id: str) -> None:
        param = next(model.parameters())
        super().__init__(
            "causal",
            model_id,
            tokenizer,
            model.get_input_embeddings(),
            _position_limit(model.config, tokenizer),
            settings,
            param.device,
            param.dtype,
        )
        self.model = model
        self.base = model.base_model
        lm_head = model.get_output_embeddings()
        config = model.config
        # Models that post-process their logits (soft-capping, scaling) take the full route at
        # the last position only; plain linear heads multiply by the label rows alone.
        self.full_route = (
            not isinstance(lm_head, nn.Linear)
            or getattr(config, "final_logit_softcapping", None) is not None
            or getattr(config, "logit_scale", None) is not None
        )
        self.lm_head = lm_head

    def _inputs(self, batch: RowBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask, offset = self._tensors(batch, "left")
        embeds = inject_prompts(self._embed(ids), batch, offset=offset, in_place=True)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return embeds, mask, positions

    def label_logits(self, batch: RowBatch) -> torch.Tensor:
        assert batch.label_ids is not None
        embeds, mask, positions = self._inputs(batch)
        label_ids = torch.as_tensor(batch.label_ids, device=self.device)
        common = {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": False,
        }
        if self.full_route:
            logits = self.model(**common, logits_to_keep=1).logits[:, -1].index_select(1, label_ids)
        else:
            assert isinstance(self.lm_head, nn.Linear)
            last = self.base(**common).last_hidden_state[:, -1]
            logits = last @ self.lm_head.weight.index_select(0, label_ids).T
            if self.lm_head.bias is not None:
                logits = logits + self.lm_head.bias.index_select(0, label_ids)
        return logits.float().cpu()

    @torch.inference_mode()
    def placeholder_embeddings(self, ids: list[int], prompt_start: int) -> torch.Tensor:
        return self._embed(torch.tensor(ids, device=self.device)).float()


class EmbeddingBackend(_HFBackend):
    """sentence-transformers encoders: Transformer (with inputs_embeds) -> Pooling (prompt rows
    masked out) -> the remaining modules (Normalize, Dense) -> sentence embedding."""

    def __init__(self, st_model: Any, settings: ServiceSettings, model_id: str) -> None:
        first = st_model[0]
        auto_model = getattr(first, "auto_model", None)
        if auto_model is None:
            raise ValueError(f"the first module of {model_id!r} is not a Transformer module")
        param = next(auto_model.parameters())
        limit = _position_limit(auto_model.config, first.tokenizer)
        st_max = getattr(st_model, "max_seq_length", None)
        if isinstance(st_max, int) and st_max > 0:
            limit = min(limit, st_max)
        super().__init__(
            "embedding",
            model_id,
            first.tokenizer,
            auto_model.get_input_embeddings(),
            limit,
            settings,
            param.device,
            param.dtype,
        )
        self.st_model = st_model
        self.encoder = auto_model
        self.after = [st_model[i] for i in range(1, len(st_model))]

    def sentence_embeddings(self, batch: RowBatch) -> torch.Tensor:
        ids, mask, _ = self._tensors(batch, "right")
        embeds = inject_prompts(self._embed(ids), batch, in_place=True)
        hidden = self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        pool_mask = mask.clone()
        # The prompt acts on the input through attention; the pooled vector is the input's own.
        pool_mask[:, batch.prompt_start : batch.prompt_start + batch.prompt_length] = 0
        features: dict[str, Any] = {"token_embeddings": hidden, "attention_mask": pool_mask}
        for module in self.after:
            features = module(features)
        out: torch.Tensor = features["sentence_embedding"]
        return out.float()

    @torch.inference_mode()
    def placeholder_embeddings(self, ids: list[int], prompt_start: int) -> torch.Tensor:
        return self._embed(torch.tensor(ids, device=self.device)).float()


def load_transformers_backend(settings: ServiceSettings, head: HeadName, model_id: str) -> Backend:
    """Load ``settings.model`` for ``head`` with transformers (or sentence-transformers)."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    log.info("loading %s (%s head) on %s in %s", settings.model, head, device, _dtype_name(dtype))
    return _LOADERS[head](settings, model_id, device, dtype)


def _load_embedding(
    settings: ServiceSettings, model_id: str, device: torch.device, dtype: torch.dtype
) -> Backend:
    from sentence_transformers import SentenceTransformer

    st_model = SentenceTransformer(settings.model, device=str(device))
    st_model.to(dtype)
    st_model.eval()
    return EmbeddingBackend(st_model, settings, model_id)


def _load_mlm(settings: ServiceSettings, model_id: str, device: torch.device, dtype: torch.dtype) -> Backend:
    from transformers import AutoModelForMaskedLM

    model, tokenizer = _load_lm(AutoModelForMaskedLM, settings, device, dtype)
    return MlmBackend(model, tokenizer, settings, model_id)


def _load_causal(
    settings: ServiceSettings, model_id: str, device: torch.device, dtype: torch.dtype
) -> Backend:
    from transformers import AutoModelForCausalLM

    model, tokenizer = _load_lm(AutoModelForCausalLM, settings, device, dtype)
    return CausalBackend(model, tokenizer, settings, model_id)


def _load_lm(
    auto: Any, settings: ServiceSettings, device: torch.device, dtype: torch.dtype
) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    model: Any = auto.from_pretrained(settings.model, **_load_kwargs(dtype))
    model = model.to(device)
    model.eval()
    return model, tokenizer


# One loader per head; settings.HeadName lists the same three.
_LOADERS: dict[str, Callable[[ServiceSettings, str, torch.device, torch.dtype], Backend]] = {
    "embedding": _load_embedding,
    "mlm": _load_mlm,
    "causal": _load_causal,
}
