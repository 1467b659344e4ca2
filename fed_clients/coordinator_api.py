"""The coordinator as a site sees it: who am I, what is my task, here is my update / evaluation."""

from __future__ import annotations

from typing import Any

from fed_clients.transport import JsonService
from protos import ClientIdentity, ClientUpdate, EvalReport, PromptResponse, Task, UpdateAck

# Extra read time on top of the long-poll wait, so a slow answer is not mistaken for a dead server.
LONG_POLL_SLACK_S = 30.0


class CoordinatorService:
    """Typed calls to the coordinator with the client's bearer token."""

    def __init__(self, http: JsonService) -> None:
        self.http = http

    def whoami(self) -> ClientIdentity:
        return self.http.get("/v1/whoami", ClientIdentity)

    def task(self, run_id: str, wait_s: float) -> Task:
        """Long-poll for the next task: the coordinator answers at once when there is one, or
        after ``wait_s`` seconds with ``wait``."""
        params = {"wait": f"{wait_s:g}"} if wait_s > 0 else None
        return self.http.get(
            f"/v1/runs/{run_id}/task", Task, params=params, timeout_s=wait_s + LONG_POLL_SLACK_S
        )

    def post_update(self, run_id: str, round_: int, update: ClientUpdate) -> UpdateAck:
        return self.http.post(f"/v1/runs/{run_id}/rounds/{round_}/updates", update, UpdateAck)

    def post_eval(self, run_id: str, round_: int, report: EvalReport) -> Any:
        response = self.http.post_raw(f"/v1/runs/{run_id}/rounds/{round_}/eval", report)
        try:
            return response.json()
        except ValueError:
            return None

    def prompt(self, run_id: str, state: str = "selected") -> PromptResponse:
        """The run's prompt: ``state`` selected (the default), final, or a state index."""
        return self.http.get(f"/v1/runs/{run_id}/prompt", PromptResponse, params={"state": state})
