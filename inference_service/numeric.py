"""The numeric contract of ``/v1/score`` (and ``/v1/score/handle``): never a 5xx for a number.

The schema already refuses NaN and Inf in every array. Finite numbers can still overflow float32 or
the model's own arithmetic, so a request must also respect these bounds, each a 400 that names the
field, the bound and the fix:

- ``z``: every entry within +-``Z_BOUND`` (1e6; a CMA-ES search stays within a few step sizes of its
  mean, and a float64 1e300 would turn into Inf on the way to float32);
- the projection: A's entry scale ``alpha * std(E) / (sqrt(d) * sigma0)`` at most ``PROMPT_BOUND``
  (a tiny sigma0 or a huge alpha would fill A with Inf);
- the prompt the model sees: every entry of the offsets A.z, or of ``prompt_embeds``, finite and
  within +-``PROMPT_BOUND`` (1e4; word embeddings are of order 0.01-1).

A request inside the bounds whose forward pass still yields a non-finite logit (a model in float16
overflowing inside attention, say) is a 422 naming the prompts and inputs concerned: the numbers
were legal but this model cannot compute them. Nothing is clamped: a logit is either what the model
computed or the call fails, so a client never optimises against made-up values.
"""

from __future__ import annotations

import numpy as np
import torch

from inference_service.errors import BadRequest, ServiceError

Z_BOUND = 1e6
PROMPT_BOUND = 1e4


class NonFiniteLogits(ServiceError):
    """The model's forward pass produced NaN or Inf for a request inside the bounds."""

    status = 422


def check_z(z: np.ndarray) -> None:
    """``z`` [P, d] as received (float16/32/64): every entry within +-Z_BOUND."""
    largest = float(np.abs(z).max()) if z.size else 0.0
    if largest > Z_BOUND:
        p, i = np.unravel_index(int(np.abs(z).argmax()), z.shape)
        raise BadRequest(
            f"z[{p}][{i}] = {float(z[p, i]):.4g}; this service accepts z entries within +-{Z_BOUND:.0e} "
            "(scale the search down: a smaller step size or a projection with a larger alpha)"
        )


def check_scale(scale: float, sigma0: float, alpha: float) -> None:
    """A's entry scale (``projection_scale``) must be finite and at most PROMPT_BOUND."""
    if not np.isfinite(scale) or scale > PROMPT_BOUND:
        raise BadRequest(
            f"the projection's entry scale alpha * std(E) / (sqrt(d) * sigma0) is {scale:.4g} "
            f"(sigma0 = {sigma0:.4g}, alpha = {alpha:.4g}); this service accepts at most "
            f"{PROMPT_BOUND:.0e}: raise projection.sigma0 or lower projection.alpha"
        )


def prompt_magnitude(prompts: torch.Tensor | np.ndarray) -> np.ndarray:
    """The largest |entry| of each prompt [P, L, hidden] (NaN where one is NaN), as float64."""
    if isinstance(prompts, torch.Tensor):
        return prompts.detach().abs().amax(dim=(1, 2)).double().cpu().numpy()
    return np.abs(np.asarray(prompts, dtype=np.float64)).max(axis=(1, 2))


def check_prompt(prompts: torch.Tensor | np.ndarray, field: str, fix: str) -> None:
    """Every entry of the prompt rows [P, L, hidden] finite and within +-PROMPT_BOUND."""
    magnitude = prompt_magnitude(prompts)
    bad = np.flatnonzero(~(magnitude <= PROMPT_BOUND))  # NaN compares False: caught too
    if bad.size:
        p = int(bad[0])
        raise BadRequest(
            f"{field} of prompt {p} reaches {float(magnitude[p]):.4g}; this service accepts prompt "
            f"entries within +-{PROMPT_BOUND:.0e}: {fix}"
        )


def check_logits(logits: np.ndarray) -> None:
    """Logits [P, B, C] of one request: all finite, else NonFiniteLogits naming the rows."""
    bad = ~np.isfinite(logits).all(axis=2)
    if bad.any():
        rows = [(int(p), int(b)) for p, b in np.argwhere(bad)[:5]]
        raise NonFiniteLogits(
            f"the model produced non-finite logits for {int(bad.sum())} of {bad.size} rows "
            f"(prompt, input) {rows}{' ...' if bad.sum() > 5 else ''}: the request is inside the "
            "numeric bounds but outside what this model computes in its dtype; send smaller prompt values"
        )
