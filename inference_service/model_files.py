"""Where a model lives and which head serves it (light: no torch at import time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inference_service.settings import HeadName

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _hub_file(model: str, filename: str) -> Path | None:
    """A file of a Hub model if it is in the local cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return None
    found = try_to_load_from_cache(model, filename)
    return Path(found) if isinstance(found, str) else None


def check_model_source(model: str, allow_download: bool) -> None:
    """Fail at once, without the network, where ``model`` names no local folder and is neither in
    the Hugging Face cache nor allowed to download (ValueError saying which and how to fix it)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return
    if _looks_like_path(model):
        raise ValueError(
            f"no such model folder: {path.resolve()} (a local model is a folder holding config.json; "
            "check the path)"
        )
    if allow_download or _hub_file(model, "config.json") is not None:
        return
    raise ValueError(
        f"{model!r} is not a local folder (none at {path.resolve()}) and not in the Hugging Face cache, "
        "and downloads are off: give a model folder, or pass --allow-download "
        "(FEDBPT_ALLOW_DOWNLOAD=true) on a machine that reaches the hub"
    )


def _looks_like_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a separator is meant as a path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def is_sentence_transformer(model: str) -> bool:
    path = Path(model)
    if path.is_dir():
        return (path / "modules.json").is_file()
    return _hub_file(model, "modules.json") is not None


def read_config(model: str) -> dict[str, Any]:
    path = Path(model)
    config_file = path / "config.json" if path.is_dir() else _hub_file(model, "config.json")
    if config_file is None or not config_file.is_file():
        raise ValueError(f"no config.json for model {model!r} (not a local folder, not in the Hub cache)")
    data: dict[str, Any] = json.loads(config_file.read_text())
    return data


def infer_head(model: str) -> HeadName:
    """sentence-transformers folder -> embedding; *ForMaskedLM -> mlm; causal LM -> causal."""
    if is_sentence_transformer(model):
        return "embedding"
    architectures = read_config(model).get("architectures") or []
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return "mlm"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal"
    raise ValueError(
        f"cannot tell the head of {model!r} from its architectures {architectures}; "
        "pass --head mlm|causal|embedding"
    )


def display_id(model: str, default_path: str | None) -> str:
    """The name /v1/model reports: the embedded MiniLM by its Hub id, anything else as given."""
    if default_path is not None and Path(model) == Path(default_path):
        return MINILM_ID
    return model
