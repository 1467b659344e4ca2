"""Faults in a real federation (every role a process on 127.0.0.1): the inference service is
restarted in the middle of a round; the clients ride it out with their retries and the run
completes with every client in every round."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from fedbpt_cli.services import LocalFederation, ModelServer
from protos import ProjectionSpec, RunConfig
from tests.clients.conftest import SST2_SAMPLE, write_jsonl

ROUNDS = 4


def _wait_for_round(http: httpx.Client, run_id: str, round_: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while http.get(f"/v1/runs/{run_id}").json()["round"] < round_:
        assert time.monotonic() < deadline, f"round {round_} never opened"
        time.sleep(0.2)


def test_run_completes_across_an_inference_service_restart(tiny_bert: Path, tmp_path: Path) -> None:
    config = RunConfig(
        rounds=ROUNDS,
        projection=ProjectionSpec(seed=5, intrinsic_dim=16, prompt_length=4),
        local_popsize=4,
        local_iters=3,
        max_input_tokens=24,
        eval_every=0,
        round_timeout_s=600,
    )
    federation = LocalFederation(tmp_path, ModelServer(str(tiny_bert)))
    try:
        federation.start_services()
        run_id, tokens = federation.create_run(config, 2)
        for k, token in enumerate(tokens):
            data = write_jsonl(tmp_path / f"site{k}.jsonl", SST2_SAMPLE[k::2])
            federation.start_client(k, token, data, None, poll_wait=1.0)
        federation.start_run(run_id)
        with federation.admin() as http:
            _wait_for_round(http, run_id, 1)
            federation.restart("serve-model", down_s=3.0)  # clients are training round 1 now
            _wait_for_round(http, run_id, ROUNDS)
            deadline = time.monotonic() + 300
            while (info := http.get(f"/v1/runs/{run_id}").json())["state"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.5)
            rounds = http.get(f"/v1/runs/{run_id}/rounds").json()
        assert info["state"] == "finished", info
        assert [len(r["participants"]) for r in rounds] == [2] * ROUNDS
        for client in federation.clients:
            assert client.wait(timeout=120) == 0, client.log_tail()
        model_log = (tmp_path / "logs" / "serve-model.log").read_text()
        assert model_log.count("Application startup complete") == 2  # it really restarted
    finally:
        federation.stop()
