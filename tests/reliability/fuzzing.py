"""Property-based requests from a service's own OpenAPI schema (schemathesis + hypothesis), sent
to a real process over HTTP: no answer may be a 5xx, and a 4xx must leave ``state()`` unchanged."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings


def fuzz(
    url: str,
    headers: dict[str, str],
    cases: int,
    state: Callable[[], object] = lambda: None,
    path_parameters: dict[str, str] | None = None,
    query: dict[str, dict[str, Any]] | None = None,
) -> dict[str, list[int]]:
    """Up to ``cases`` generated requests per operation; returns the statuses seen per operation.
    Every other case has its path parameters set from ``path_parameters`` (ids that exist), so
    the checks reach past "unknown id"; ``query`` adds fixed query parameters per path."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    seen: dict[str, set[int]] = {}
    turn = itertools.count()

    for operation in operations:

        @settings(max_examples=cases, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def one(case: Any) -> None:
            if path_parameters and case.path_parameters and next(turn) % 2 == 0:
                case.path_parameters = {k: path_parameters.get(k, v) for k, v in case.path_parameters.items()}
            if query and case.path in query:
                case.query = {**(case.query or {}), **query[case.path]}
            before = state()
            response = case.call(base_url=url, headers=headers, timeout=60)
            label = f"{case.method} {case.path}"
            seen.setdefault(label, set()).add(response.status_code)
            assert response.status_code < 500, (label, response.status_code, response.text[:500])
            if 400 <= response.status_code < 500:
                assert state() == before, (label, response.status_code, response.text[:300])

        one()
    return {k: sorted(v) for k, v in sorted(seen.items())}
