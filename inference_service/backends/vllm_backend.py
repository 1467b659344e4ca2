"""The vLLM backend for the ``causal`` head: the prompt goes to the engine as ``prompt_embeds``.

Each row becomes one vLLM prompt: [BOS embedding] + soft prompt + templated input embeddings, built
here from the model's own input-embedding table (read from the checkpoint's safetensors files, not
by loading the model a second time). The engine is built with ``enable_prompt_embeds``, prefix
caching off (cached prefixes are keyed by token ids, which embeddings do not have) and
``logprobs_mode="raw_logits"``; one generation step with ``logprob_token_ids`` returns the raw
logits of the label words at the last position, nothing else. vLLM schedules and batches the rows
of a call itself (continuous batching), so the scorer hands it each call's rows at once.

Everything is validated by the shared scorer before the engine sees it (hidden size, sequence
length, finite values, label ids): vLLM's offline path checks only the tensor's rank, and a bad
tensor can kill its engine process. If the engine dies anyway, :meth:`failure` says so and
``/readyz`` fails; calls answer 503 instead of hanging.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.nn import functional

from inference_service.backends.base import (
    Backend,
    ModelDescription,
    RowBatch,
    embedding_matrix_std,
    prompted_input_embeds,
)
from inference_service.errors import Unavailable
from inference_service.settings import HeadName, ServiceSettings
from inference_service.text import TextCodec

log = logging.getLogger(__name__)

# Names under which causal LMs keep their input embedding table in a checkpoint.
EMBEDDING_KEYS = (
    "model.embed_tokens.weight",  # Llama, Mistral, Qwen, Gemma
    "transformer.wte.weight",  # GPT-2
    "model.decoder.embed_tokens.weight",  # OPT
    "gpt_neox.embed_in.weight",  # Pythia
    "transformer.word_embeddings.weight",  # Bloom, Falcon
)


class Engine(Protocol):
    """What this backend uses of ``vllm.LLM``."""

    def generate(self, prompts: Any, sampling_params: Any = None, *, use_tqdm: bool = True) -> list[Any]: ...


def _safetensors_files(model: str) -> list[Path]:
    path = Path(model)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        # Only a model already in the local cache: nothing is downloaded at run time.
        path = Path(
            snapshot_download(model, local_files_only=True, allow_patterns=["*.json", "*.safetensors"])
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{model}: no .safetensors files (the vLLM backend reads the embedding table from them)"
        )
    return files


def read_input_embeddings(model: str) -> torch.Tensor:
    """The input word-embedding matrix [vocab, hidden] as float32, read from the checkpoint alone."""
    from safetensors import safe_open

    for file in _safetensors_files(model):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key in EMBEDDING_KEYS:
                if key in keys:
                    return f.get_tensor(key).float()
    raise ValueError(f"{model}: no input embedding table under any of {EMBEDDING_KEYS}")


def _is_engine_dead(exc: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError)


class VllmCausalBackend(Backend):
    """The causal head on a vLLM engine (``vllm.LLM`` or anything with its ``generate``)."""

    # The scorer's token budget per call to the engine: vLLM schedules the rows itself, so one
    # call per request lets it batch them all (its own max_num_batched_tokens bounds a step).
    preferred_batch_tokens = 1 << 24

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        embeddings: torch.Tensor,
        model_id: str,
        max_length: int,
        dtype: str,
        device: str,
    ) -> None:
        self.engine = engine
        self.embeddings = embeddings
        vocab_size, hidden_size = int(embeddings.shape[0]), int(embeddings.shape[1])
        self.codec = TextCodec(tokenizer, vocab_size)
        # Prompt rows are assembled on the CPU; the engine moves them to its device and dtype.
        self.device = torch.device("cpu")
        self.description = ModelDescription(
            model_id=model_id,
            head="causal",
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            max_length=max_length,
            dtype=dtype,
            device=device,
            backend="vllm",
        )
        self._std: float | None = None
        self._failure: str | None = None

    def embedding_std(self) -> float:
        if self._std is None:
            self._std = embedding_matrix_std(self.embeddings)
        return self._std

    def placeholder_embeddings(self, ids: list[int], prompt_start: int) -> torch.Tensor:
        return self.embeddings[torch.tensor(ids)].float()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return functional.embedding(ids, self.embeddings)

    def label_logits(self, batch: RowBatch) -> torch.Tensor:
        from vllm import SamplingParams

        assert batch.label_ids is not None
        if self.failure() is not None:
            raise Unavailable(f"the vLLM engine has stopped: {self._failure}")
        label_ids = list(batch.label_ids)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=label_ids, detokenize=False)
        prompts = [{"prompt_embeds": row} for row in prompted_input_embeds(batch, self._embed)]
        try:
            outputs = self.engine.generate(prompts, params, use_tqdm=False)
        except Exception as exc:
            if _is_engine_dead(exc):
                self._failure = f"{type(exc).__name__}: {exc}"
                log.error("the vLLM engine died: %s", self._failure)
                raise Unavailable(f"the vLLM engine has stopped: {self._failure}") from exc
            raise
        # logprobs[0] maps token id -> Logprob for the asked ids (plus the sampled token).
        return torch.tensor(
            [[out.outputs[0].logprobs[0][t].logprob for t in label_ids] for out in outputs],
            dtype=torch.float32,
        )

    def failure(self) -> str | None:
        if self._failure is None:
            # vLLM's client watches its engine-core process and flags it when it exits.
            core = getattr(getattr(self.engine, "llm_engine", None), "engine_core", None)
            if getattr(getattr(core, "resources", None), "engine_dead", False):
                self._failure = "the engine core process exited"
        return self._failure

    def close(self) -> None:
        shutdown = getattr(getattr(self.engine, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()


def _engine_dtype(settings: ServiceSettings, on_gpu: bool) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    if not on_gpu:
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def load_vllm_backend(settings: ServiceSettings, head: HeadName, model_id: str) -> Backend:
    """Start a vLLM engine on ``settings.model`` (causal head only)."""
    if head != "causal":
        raise ValueError(f"the vLLM backend serves the causal head only, not {head!r}")
    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM

    on_gpu = torch.cuda.is_available() and settings.device != "cpu"
    dtype = _engine_dtype(settings, on_gpu)
    config = AutoConfig.from_pretrained(settings.model)
    positions = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    max_len = min(settings.max_length or positions, positions)
    log.info("starting vLLM on %s (%s, max_model_len %d)", settings.model, dtype, max_len)
    engine = LLM(
        model=settings.model,
        enable_prompt_embeds=True,
        enable_prefix_caching=False,
        logprobs_mode="raw_logits",
        dtype=dtype,
        max_model_len=max_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        seed=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    embeddings = read_input_embeddings(settings.model)
    return VllmCausalBackend(
        engine, tokenizer, embeddings, model_id, max_len, dtype, "cuda" if on_gpu else "cpu"
    )
