"""Fixtures of the inference-service tests: tiny random models (built once per session, saved with
save_pretrained and loaded with from_pretrained), their backends, the real MiniLM (loaded once per
process), and request builders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference_service.backends import load_backend
from inference_service.backends.base import Backend
from inference_service.random_models import build_random_model
from inference_service.scoring import Scorer
from inference_service.settings import ServiceSettings, default_model_path
from protos import Array, ProjectionSpec, ScoreRequest, TaskSpec

# (template, labels) per architecture, in the shapes the presets use.
TASKS: dict[str, TaskSpec] = {
    "bert": TaskSpec(template="{input} . It was {mask} .", labels=["bad", "great"]),
    "roberta": TaskSpec(template="{input} . It was {mask} .", labels=["bad", "great"]),
    "llama": TaskSpec(template="{input} . The sentiment is", labels=["negative", "positive"]),
    "st-bert": TaskSpec(template="{input}", labels=["this is bad", "this is great"]),
    "minilm": TaskSpec(template="{input}", labels=["a negative review", "a positive review"]),
}
HEADS = {"bert": "mlm", "roberta": "mlm", "llama": "causal", "st-bert": "embedding", "minilm": "embedding"}

TEXTS = [
    "a great movie",
    "it was awful and bad , really the worst film of the year",
    "fine",
    "the story of the characters is funny and sad at the same time , not good but not bad",
    "terrible",
]


class Zoo:
    """Tiny models built on demand into one session folder; backends cached by (name, settings)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[str, Path] = {}
        self._backends: dict[tuple[str, tuple[tuple[str, Any], ...]], Backend] = {}

    def path(self, name: str) -> Path:
        if name == "minilm":
            return Path(default_model_path())
        if name not in self._paths:
            self._paths[name] = build_random_model(name, self.root / name)
        return self._paths[name]

    def settings(self, name: str, **overrides: Any) -> ServiceSettings:
        return ServiceSettings(model=str(self.path(name)), device="cpu", **overrides)

    def backend(self, name: str, **overrides: Any) -> Backend:
        # Only settings the backend itself reads make a new backend; scorer settings reuse it.
        load_keys = {"zero_mlm_bias", "max_length", "dtype"}
        key = (name, tuple(sorted((k, v) for k, v in overrides.items() if k in load_keys)))
        if key not in self._backends:
            self._backends[key] = load_backend(self.settings(name, **{k: v for k, v in key[1]}))
        return self._backends[key]

    def scorer(self, name: str, **overrides: Any) -> Scorer:
        return Scorer(self.backend(name, **overrides), self.settings(name, **overrides))


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoo]:
    yield Zoo(tmp_path_factory.mktemp("models"))


def z_request(
    name: str,
    z: np.ndarray,
    texts: list[str] | None = None,
    spec: ProjectionSpec | None = None,
    **extra: Any,
) -> ScoreRequest:
    spec = spec or ProjectionSpec(seed=11, intrinsic_dim=z.shape[1], prompt_length=6)
    return ScoreRequest(
        projection=spec,
        z=Array.from_numpy(z.astype(np.float32)),
        task=TASKS[name],
        texts=texts or TEXTS,
        **extra,
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def population() -> Callable[[int, int], np.ndarray]:
    """P candidate z's of dimension d, scaled so that tiny random models move visibly."""

    def make(p: int, d: int, scale: float = 3.0) -> np.ndarray:
        return (np.random.default_rng(p * 1000 + d).normal(size=(p, d)) * scale).astype(np.float32)

    return make
