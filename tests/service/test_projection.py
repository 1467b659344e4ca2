"""The projection A: deterministic per spec (across processes too), BBT's scale, one matmul."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from inference_service.projection import (
    ProjectionCache,
    generate_projection,
    projection_checksum,
    projection_scale,
    prompt_offsets,
)
from protos import ProjectionSpec

# Pinned: a change here means every running federation would silently get another A.
GOLDEN = {
    "normal": "41e11c382879cf3203d7f18371fb8803bc31b56e2cb5330916691b53451096cf",
    "uniform": "b0f32c1d71194bde9ed0adbef925c0020f157d60c75127d1399dea44236bd322",
}

_CHILD = """
import sys
from inference_service.projection import generate_projection, projection_checksum
from protos import ProjectionSpec
spec = ProjectionSpec(seed=int(sys.argv[1]), intrinsic_dim=50, prompt_length=10)
print(projection_checksum(generate_projection(spec, 64, 0.03)))
"""


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_golden_checksum(distribution: str) -> None:
    spec = ProjectionSpec(seed=7, intrinsic_dim=4, prompt_length=3, distribution=distribution)  # type: ignore[arg-type]
    a = generate_projection(spec, 5, 0.5)
    assert a.shape == (4, 15) and a.dtype == torch.float32
    assert projection_checksum(a) == GOLDEN[distribution]


def test_same_spec_same_matrix_in_two_processes() -> None:
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD, "99"], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [c.communicate(timeout=120)[0].strip() for c in children]
    assert all(c.returncode == 0 for c in children)
    here = projection_checksum(
        generate_projection(ProjectionSpec(seed=99, intrinsic_dim=50, prompt_length=10), 64, 0.03)
    )
    assert outputs == [here, here]
    other = generate_projection(ProjectionSpec(seed=100, intrinsic_dim=50, prompt_length=10), 64, 0.03)
    assert projection_checksum(other) != here


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_scale_follows_bbt(distribution: str) -> None:
    spec = ProjectionSpec(
        seed=3, intrinsic_dim=100, prompt_length=20, sigma0=2.0, alpha=1.5, distribution=distribution
    )  # type: ignore[arg-type]
    std_e = 0.04
    a = generate_projection(spec, 64, std_e)
    expected = 1.5 * std_e / (math.sqrt(100) * 2.0)
    assert projection_scale(spec, std_e) == pytest.approx(expected)
    assert float(a.std()) == pytest.approx(expected, rel=0.02)
    assert abs(float(a.mean())) < expected * 0.02
    if distribution == "uniform":
        assert float(a.abs().max()) <= expected * math.sqrt(3) * (1 + 1e-6)


def test_offsets_are_one_matmul_of_the_population() -> None:
    spec = ProjectionSpec(seed=5, intrinsic_dim=8, prompt_length=3)
    a = generate_projection(spec, 4, 1.0)
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    out = prompt_offsets(z, a, 3, 4)
    assert out.shape == (5, 3, 4)
    for p in range(5):
        torch.testing.assert_close(out[p], (a.T @ z[p]).view(3, 4))


def test_cache_reuses_and_evicts() -> None:
    cache = ProjectionCache(hidden_size=4, embedding_std=1.0, device=torch.device("cpu"), size=2)
    specs = [ProjectionSpec(seed=s, intrinsic_dim=3, prompt_length=2) for s in range(3)]
    first = cache.get(specs[0])
    assert cache.get(specs[0]) is first and cache.hits == 1
    cache.get(specs[1])
    cache.get(specs[2])  # evicts spec 0, the least recently used
    assert len(cache) == 2
    again = cache.get(specs[0])
    assert again is not first
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert cache.misses == 4


def test_the_placeholder_p0_survives_a_body_written_without_nulls() -> None:
    """Clients write bodies with exclude_none (fed_clients.transport): the choice of BBT's
    placeholders must not be a null that such a writer drops (it once fell back to the default
    phrase that way, silently, in the reference row of the results grid)."""
    spec = ProjectionSpec(init="placeholder")
    sent = ProjectionSpec.model_validate_json(spec.model_dump_json(exclude_none=True))
    assert sent.init == "placeholder" and sent.p0_text is None
    assert ProjectionSpec().p0_text == ProjectionSpec().init_text == "In a few words:"
    a = ProjectionCache(hidden_size=8, embedding_std=0.1, device=torch.device("cpu"))
    assert a.get(spec) is a.get(ProjectionSpec())  # p0 does not change A: one cached matrix
