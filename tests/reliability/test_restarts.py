"""Faults in a real federation (every role a process on 127.0.0.1): the inference service is
restarted in the middle of a round (the clients ride it out with their retries and the run
completes with every client in every round); a client dies mid-round (the round closes at its
deadline with the others, and the client rejoins later)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port
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


def test_a_client_killed_mid_round_is_waited_for_only_until_the_deadline(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """Site 2 is cut off from the model (its endpoint answers nothing) and killed during round 0:
    round 0 closes at its deadline with sites 0 and 1; site 2, started again, rejoins later rounds."""
    config = RunConfig(
        rounds=3,
        min_clients=2,
        round_timeout_s=15,
        projection=ProjectionSpec(seed=6, intrinsic_dim=16, prompt_length=4),
        local_popsize=4,
        local_iters=2,
        max_input_tokens=24,
        eval_every=0,
    )
    federation = LocalFederation(tmp_path, ModelServer(str(tiny_bert)))
    try:
        federation.start_services()
        run_id, tokens = federation.create_run(config, 3)
        files = [write_jsonl(tmp_path / f"site{k}.jsonl", SST2_SAMPLE[k::3]) for k in range(3)]
        for k in (0, 1):
            federation.start_client(k, tokens[k], files[k], None, poll_wait=1.0)
        cut_off = ManagedProcess(
            "client-2-cut-off",
            fedbpt_command(
                "client",
                "--coordinator",
                federation.coordinator_url,
                "--data",
                str(files[2]),
                "--model-endpoint",
                f"http://127.0.0.1:{free_port()}",
                "--poll-wait",
                "1",
            ),
            tmp_path / "logs" / "client-2-cut-off.log",
            env={"FEDBPT_TOKEN": tokens[2]},
        ).start()
        federation.start_run(run_id)
        with federation.admin() as http:
            time.sleep(4)  # sites 0 and 1 answer round 0; site 2 keeps retrying the model
            assert cut_off.alive()
            cut_off.kill()
            _wait_for_round(http, run_id, 1, timeout=60)  # the deadline closed round 0
            federation.start_client(2, tokens[2], files[2], None, poll_wait=1.0)
            deadline = time.monotonic() + 300
            while http.get(f"/v1/runs/{run_id}").json()["state"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.5)
            rounds = http.get(f"/v1/runs/{run_id}/rounds").json()
        names = [sorted(p["name"] for p in r["participants"]) for r in rounds]
        assert names[0] == ["site-0", "site-1"]  # closed at the deadline without site 2
        assert rounds[0]["attempt"] == 1 and rounds[0]["closed_at"] - rounds[0]["opened_at"] >= 14
        assert any("site-2" in n for n in names[1:]), names  # site 2 rejoined
    finally:
        federation.stop()
