"""The random projection A of BBT/FedBPT and the prompt offsets A.z of a whole population.

A is ``intrinsic_dim x (prompt_length * hidden)``, drawn on a seeded **CPU** ``torch.Generator``
(CUDA generators give other numbers for the same seed, so "same spec -> same A on any replica"
holds only on CPU), scaled by ``s = alpha * std(word embeddings) / (sqrt(d) * sigma0)``, and only
then moved to the model's device. ``uniform`` draws U(-sqrt(3), sqrt(3)) * s: the same std.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict

import torch

from protos.scoring import ProjectionSpec


def projection_scale(spec: ProjectionSpec, embedding_std: float) -> float:
    """BBT's std of every entry of A: alpha * std(E) / (sqrt(d) * sigma0)."""
    return spec.alpha * embedding_std / (math.sqrt(spec.intrinsic_dim) * spec.sigma0)


def generate_projection(spec: ProjectionSpec, hidden_size: int, embedding_std: float) -> torch.Tensor:
    """A [d, L*hidden] in float32 on CPU, a pure function of (spec, hidden_size, embedding_std)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(spec.seed)
    shape = (spec.intrinsic_dim, spec.prompt_length * hidden_size)
    if spec.distribution == "normal":
        a = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
    else:
        a = torch.rand(shape, generator=generator, dtype=torch.float32, device="cpu")
        a.mul_(2.0).sub_(1.0).mul_(math.sqrt(3.0))
    return a.mul_(projection_scale(spec, embedding_std))


def projection_checksum(a: torch.Tensor) -> str:
    """sha256 of A's little-endian float32 bytes (pinned in the tests, compared across replicas)."""
    data = a.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
    return hashlib.sha256(data).hexdigest()


class ProjectionCache:
    """A few projection matrices, keyed by spec, on the model's device (thread-safe LRU)."""

    def __init__(self, hidden_size: int, embedding_std: float, device: torch.device, size: int = 4) -> None:
        self.hidden_size = hidden_size
        self.embedding_std = embedding_std
        self.device = device
        self.size = size
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, spec: ProjectionSpec) -> torch.Tensor:
        key = spec.model_dump_json(exclude={"init", "init_text"})  # p0 does not change A
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        a = generate_projection(spec, self.hidden_size, self.embedding_std).to(self.device)
        with self._lock:
            self.misses += 1
            self._items[key] = a
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return a

    def __len__(self) -> int:
        return len(self._items)


def prompt_offsets(z: torch.Tensor, a: torch.Tensor, prompt_length: int, hidden_size: int) -> torch.Tensor:
    """A.z for the whole population in ONE matmul: z [P, d] @ A [d, L*hidden] -> [P, L, hidden]."""
    z = z.to(device=a.device, dtype=torch.float32)
    return (z @ a).view(z.shape[0], prompt_length, hidden_size)
