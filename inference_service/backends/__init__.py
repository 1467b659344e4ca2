"""Model backends of the inference service (transformers; vLLM for causal LMs).

``load_backend`` picks the head (given, or inferred from the model) and the backend. The vLLM
backend lives in ``inference_service/backends/vllm_backend.py`` and exposes
``load_vllm_backend(settings, head, model_id) -> Backend``; it is imported only when asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from inference_service.model_files import check_model_source, display_id, infer_head
from inference_service.settings import BackendName, HeadName, ServiceSettings, default_model_path

if TYPE_CHECKING:
    from inference_service.backends.base import Backend


def load_backend(settings: ServiceSettings) -> Backend:
    if not settings.allow_download:
        # Before the hub client is first imported (it reads these once): no request leaves.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    check_model_source(settings.model, settings.allow_download)
    head = settings.head or infer_head(settings.model)
    try:
        default = default_model_path()
    except ImportError:
        default = None
    model_id = settings.model_id or display_id(settings.model, default)
    return _LOADERS[settings.backend](settings, head, model_id)


def _load_vllm(settings: ServiceSettings, head: HeadName, model_id: str) -> Backend:
    # The engine itself is imported inside load_vllm_backend: look for it first, so that a missing
    # install is a refusal with what to do rather than a traceback from deep inside the loader.
    if head != "causal":
        raise ValueError(f"the vLLM backend serves the causal head only, not {head!r}")
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "the vLLM backend is not available here: vllm is not installed in this environment "
            "(on a GPU: pip install 'fedbpt[vllm]'; on CPU: make setup-vllm and run from .venv-vllm)"
        )
    module = importlib.import_module("inference_service.backends.vllm_backend")
    backend: Backend = module.load_vllm_backend(settings, head, model_id)
    return backend


def _load_transformers(settings: ServiceSettings, head: HeadName, model_id: str) -> Backend:
    from inference_service.backends.transformers_backend import load_transformers_backend

    return load_transformers_backend(settings, head, model_id)


# One loader per ServiceSettings.backend; each imports its engine only when asked for.
_LOADERS: dict[BackendName, Callable[[ServiceSettings, HeadName, str], Backend]] = {
    "transformers": _load_transformers,
    "vllm": _load_vllm,
}
