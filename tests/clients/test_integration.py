"""End to end with the real services as processes: ``fedbpt serve-model`` (tiny random BERT),
``fedbpt serve-coordinator`` (SQLite file), and two ``fedbpt client`` processes for two rounds;
then ``fedbpt evaluate`` on the run's prompt URL.

Runs once the coordinator is in the tree (``coordinator.cli``); it speaks only the wire contract
of ARCHITECTURE.md.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fed_clients.client import SiteClient
from fed_clients.coordinator_api import CoordinatorService
from fed_clients.data import LabeledTexts, load_labeled_texts
from fed_clients.model_api import ModelService
from fed_clients.perturb import Perturber
from fed_clients.transport import JsonService, RetryPolicy, ServiceUnavailable
from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running
from protos import HandleScoreRequest, InputsRegistration, PromptResponse, RunConfig
from tests.clients.conftest import SST2_SAMPLE, Relay, write_jsonl

ADMIN = "integration-admin-token"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def coordinator_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("coordinator")
    port = free_port()
    argv = fedbpt_command(
        "serve-coordinator", "--db", str(root / "runs.sqlite"), "--host", "127.0.0.1", "--port", str(port)
    )
    proc = ManagedProcess(
        "serve-coordinator", argv, root / "coordinator.log", env={"FEDBPT_ADMIN_TOKEN": ADMIN}
    )
    url = f"http://127.0.0.1:{port}"
    with running(proc, ready_url=f"{url}/healthz", timeout=120):
        yield url


def _run_clients(
    model_url: str,
    coordinator_url: str,
    tmp_path: Path,
    tokens: list[str],
    test_file: Path,
    extra: Callable[[int], list[str]] = lambda k: [],
) -> list[ManagedProcess]:
    """One ``fedbpt client`` process per token (half of SST2_SAMPLE each), run to a clean exit."""
    clients = []
    for k, token in enumerate(tokens):
        data = write_jsonl(tmp_path / f"client_{k}.jsonl", SST2_SAMPLE[k::2])
        args = [
            "client", "--coordinator", coordinator_url, "--token", token, "--model-endpoint", model_url,
            "--data", str(data), "--test-data", str(test_file), "--poll-wait", "2", "--retry-total", "60",
        ]  # fmt: skip
        clients.append(
            ManagedProcess(
                f"client-{k}", fedbpt_command(*args, *extra(k)), tmp_path / f"client-{k}.log"
            ).start()
        )
    try:
        for proc in clients:
            assert proc.wait(timeout=600) == 0, proc.log_tail()
    finally:
        for proc in clients:
            proc.stop()
    return clients


def _start_run(coordinator_url: str, config: RunConfig, sites: int = 2) -> tuple[str, list[str]]:
    """Create the run, enrol ``site-0`` .. ``site-{sites-1}``, start it: (run id, their tokens)."""
    with httpx.Client(base_url=coordinator_url, headers=HEADERS, timeout=30) as admin:
        created = admin.post("/v1/runs", json=config.model_dump(mode="json"))
        assert created.status_code == 201, created.text
        run_id: str = created.json()["run_id"]
        tokens = [
            admin.post(f"/v1/runs/{run_id}/clients", json={"name": f"site-{k}"}).json()["token"]
            for k in range(sites)
        ]
        assert admin.post(f"/v1/runs/{run_id}/start").status_code == 200
    return run_id, tokens


def _rounds(body: Any) -> list[dict[str, Any]]:
    return body["rounds"] if isinstance(body, dict) and "rounds" in body else body


def test_two_clients_two_rounds_then_evaluate(model_url: str, coordinator_url: str, tmp_path: Path) -> None:
    config = RunConfig(
        name="client-integration",
        rounds=2,
        min_clients=2,
        round_timeout_s=300,
        task="sst2",
        projection={"seed": 11, "intrinsic_dim": 16, "prompt_length": 4},  # type: ignore[arg-type]
        local_popsize=4,
        local_iters=2,
        max_input_tokens=32,
        eval_every=1,
    )
    with httpx.Client(base_url=coordinator_url, headers=HEADERS, timeout=30) as admin:
        created = admin.post("/v1/runs", json=config.model_dump(mode="json"))
        assert created.status_code == 201, created.text
        run_id = created.json()["run_id"]
        tokens = []
        for k in range(2):
            enrolled = admin.post(f"/v1/runs/{run_id}/clients", json={"name": f"site-{k}"})
            assert enrolled.status_code in (200, 201), enrolled.text
            tokens.append(enrolled.json()["token"])
        started = admin.post(f"/v1/runs/{run_id}/start")
        assert started.status_code in (200, 202, 204), started.text
        mean_before = np.zeros(16)

    test_file = write_jsonl(tmp_path / "test.jsonl", SST2_SAMPLE)
    # site-0 finds its run through GET /v1/whoami, site-1 is told it.
    clients = _run_clients(
        model_url,
        coordinator_url,
        tmp_path,
        tokens,
        test_file,
        lambda k: ["--run-id", run_id] if k == 1 else [],
    )
    for proc in clients:
        log = proc.log_tail(20_000)
        assert "final test accuracy" in log and "trained 2 round(s)" in log, log

    with httpx.Client(base_url=coordinator_url, headers=HEADERS, timeout=30) as admin:
        info = admin.get(f"/v1/runs/{run_id}").json()
        assert info["state"] == "finished", info
        rounds = _rounds(admin.get(f"/v1/runs/{run_id}/rounds").json())
        assert [r["round"] for r in rounds] == [0, 1]
        for record in rounds:
            names = sorted(p["name"] for p in record["participants"])
            assert names == ["site-0", "site-1"], record  # each client's update arrived once
            for p in record["participants"]:
                # 6 examples a site, val_share 0.25: 1 held out for validation, 5 trained on.
                assert p["n_samples"] == 5 and p["metrics"]["n_val"] == 1
                assert 0 <= p["metrics"]["val_loss"] < 50
                # A call per generation (clean + perturbed parts), the final mean, validation.
                assert p["metrics"]["service_calls"] >= 2 + 1 + 1
                assert p["metrics"]["service_bytes_sent"] > 0
            assert record["n_val"] == 2 and record["val_loss"] == pytest.approx(
                np.mean([p["metrics"]["val_loss"] for p in record["participants"]])
            )
        # Both sites score the final state on the same 12 test examples: the mean of two shares of 12.
        final_accuracy = rounds[-1]["final_test_accuracy"]
        assert 0 <= final_accuracy <= 1 and final_accuracy * 24 == pytest.approx(round(final_accuracy * 24))
        assert 0 <= rounds[-1]["final_val_loss"] < 50  # the final state is a candidate too
        final = PromptResponse.model_validate_json(admin.get(f"/v1/runs/{run_id}/prompt?state=final").content)
        assert final.round == 2 and final.chosen == "final"
        assert not np.allclose(final.z.numpy(), mean_before)  # the global mean moved
        losses = {r["round"]: r["val_loss"] for r in rounds} | {2: rounds[-1]["final_val_loss"]}
        prompt = PromptResponse.model_validate_json(admin.get(f"/v1/runs/{run_id}/prompt").content)
        assert prompt.chosen == "selected" and prompt.round == min(losses, key=lambda k: (losses[k], k))
        assert prompt.val_loss == pytest.approx(losses[prompt.round])
        assert info["selected_state"] == prompt.round

    argv = fedbpt_command(
        "evaluate", "--model-endpoint", model_url, "--data", str(test_file),
        "--run-prompt", f"{coordinator_url}/v1/runs/{run_id}/prompt", "--token", ADMIN,
    )  # fmt: skip
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"prompt of round {prompt.round}" in done.stdout
    assert re.search(r"accuracy: [01]\.\d{4} \(\d+/12\)", done.stdout)

    # Side by side: the selected state, the final one, and the best on this data (hindsight).
    sides = subprocess.run(
        [*argv, "--state", "selected", "--state", "final", "--state", "best"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert sides.returncode == 0, sides.stderr
    found = re.findall(
        r"^\s+(selected|final|best): state\s+(\d+)\s+accuracy ([01]\.\d{4})", sides.stdout, re.M
    )
    rows = {which: (int(idx), float(acc)) for which, idx, acc in found}
    assert set(rows) == {"selected", "final", "best"}, sides.stdout
    assert rows["selected"][0] == prompt.round and rows["final"][0] == 2
    assert rows["best"][1] >= max(rows["selected"][1], rows["final"][1])


def test_shared_es_sites_score_the_servers_candidates(
    model_url: str, coordinator_url: str, tmp_path: Path
) -> None:
    """``aggregator: shared_es`` with real processes: every round each site scores the task's
    candidates in one call (no local search) and the server's ES moves the prompt."""
    config = RunConfig(
        name="shared-es-integration",
        aggregator="shared_es",
        rounds=3,
        min_clients=2,
        round_timeout_s=300,
        projection={"seed": 11, "intrinsic_dim": 16, "prompt_length": 4},  # type: ignore[arg-type]
        local_popsize=4,
        max_input_tokens=32,
        eval_every=0,
    )
    run_id, tokens = _start_run(coordinator_url, config)
    _run_clients(model_url, coordinator_url, tmp_path, tokens, write_jsonl(tmp_path / "t.jsonl", SST2_SAMPLE))
    with httpx.Client(base_url=coordinator_url, headers=HEADERS, timeout=30) as admin:
        assert admin.get(f"/v1/runs/{run_id}").json()["state"] == "finished"
        rounds = _rounds(admin.get(f"/v1/runs/{run_id}/rounds").json())
        assert [r["round"] for r in rounds] == [0, 1, 2]
        for record in rounds:
            assert sorted(p["name"] for p in record["participants"]) == ["site-0", "site-1"]
            for p in record["participants"]:
                # The four candidates on the 5 training examples and the global state on the 1
                # held out: no local search, no perturbed copy.
                assert p["metrics"]["service_rows"] == 4 * 5 + 1 and p["n_samples"] == 5
                assert p["fitness"] == p["metrics"]["train_loss"]
        final = PromptResponse.model_validate_json(admin.get(f"/v1/runs/{run_id}/prompt?state=final").content)
        assert final.round == 3 and not np.allclose(final.z.numpy(), 0.0)


def _wait_for_log(proc: ManagedProcess, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.log_tail(50_000):
            return
        assert proc.alive(), proc.log_tail()
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} never logged {text!r}:\n{proc.log_tail()}")


def test_a_client_killed_mid_run_is_restarted_and_the_run_completes(
    model_url: str, coordinator_url: str, tmp_path: Path
) -> None:
    config = RunConfig(
        name="client-restart",
        rounds=2,
        min_clients=2,
        round_timeout_s=300,
        projection={"seed": 12, "intrinsic_dim": 16, "prompt_length": 4},  # type: ignore[arg-type]
        local_popsize=4,
        local_iters=2,
        max_input_tokens=32,
        eval_every=0,
    )
    run_id, tokens = _start_run(coordinator_url, config)

    def start(k: int, attempt: int) -> ManagedProcess:
        data = write_jsonl(tmp_path / f"client_{k}.jsonl", SST2_SAMPLE[k::2])
        argv = fedbpt_command(
            "client", "--coordinator", coordinator_url, "--token", tokens[k], "--model-endpoint", model_url,
            "--data", str(data), "--poll-wait", "2", "--retry-total", "60",
        )  # fmt: skip
        return ManagedProcess(f"client-{k}-{attempt}", argv, tmp_path / f"client-{k}-{attempt}.log").start()

    # Site 0 trains round 0 alone (the round waits for site 1), then dies without a goodbye.
    first = start(0, 1)
    _wait_for_log(first, "round 0: update accepted")
    first.kill()
    # A new site-0 process and site 1: the round closes with each update once, the run finishes.
    procs = [start(0, 2), start(1, 1)]
    try:
        for proc in procs:
            assert proc.wait(timeout=600) == 0, proc.log_tail()
    finally:
        for proc in procs:
            proc.stop()
    with httpx.Client(base_url=coordinator_url, headers=HEADERS, timeout=30) as admin:
        assert admin.get(f"/v1/runs/{run_id}").json()["state"] == "finished"
        rounds = _rounds(admin.get(f"/v1/runs/{run_id}/rounds").json())
    assert [sorted(p["name"] for p in r["participants"]) for r in rounds] == [["site-0", "site-1"]] * 2
    assert "trained 1 round(s)" in procs[0].log_tail()  # the restarted site-0 trained round 1 only


def test_the_perturbation_follows_the_site_name_not_its_client_id(coordinator_url: str) -> None:
    """The same site name in two runs (two random client ids) perturbs the same tokens: a rerun
    of a run reproduces it."""
    config = RunConfig(name="perturb-key", rounds=1, projection={"intrinsic_dim": 8})  # type: ignore[arg-type]
    keys, ids = [], []
    with httpx.Client(base_url=coordinator_url, headers=HEADERS, timeout=30) as admin:
        for _ in range(2):
            run_id = admin.post("/v1/runs", json=config.model_dump(mode="json")).json()["run_id"]
            enrolled = admin.post(f"/v1/runs/{run_id}/clients", json={"name": "org-a"}).json()
            ids.append(enrolled["client_id"])
            http = JsonService(name="coordinator", base_url=coordinator_url, token=enrolled["token"])
            with http, JsonService(name="model", base_url="http://127.0.0.1:9") as unused_model:
                site = SiteClient(
                    CoordinatorService(http), ModelService(unused_model), LabeledTexts([], [], "none")
                )
                assert site.identify() == run_id
                keys.append(site.client_key)
    assert ids[0] != ids[1] and keys == ["org-a", "org-a"]
    perturber = Perturber(vocab_size=1000, special_ids=(0, 1, 2), rate=0.5)
    ids_in = [list(range(3, 60))]
    copies = [perturber.copy(ids_in, run_seed=7, round_=2, client_key=k).input_ids for k in keys]
    assert copies[0] == copies[1] != ids_in


def _one_site_run(coordinator_url: str, name: str, **config: Any) -> tuple[str, str, RunConfig]:
    """A started one-round run with one enrolled site ``name``: (run id, the site's token, config)."""
    run_config = RunConfig(
        name=name, rounds=1, min_clients=1, round_timeout_s=300, task="sst2",
        projection={"seed": 13, "intrinsic_dim": 16, "prompt_length": 4},  # type: ignore[arg-type]
        local_popsize=4, local_iters=2, max_input_tokens=32, eval_every=0, val_share=0, **config,
    )  # fmt: skip
    with httpx.Client(base_url=coordinator_url, headers=HEADERS, timeout=30) as admin:
        run_id: str = admin.post("/v1/runs", json=run_config.model_dump(mode="json")).json()["run_id"]
        token: str = admin.post(f"/v1/runs/{run_id}/clients", json={"name": name}).json()["token"]
        assert admin.post(f"/v1/runs/{run_id}/start").status_code == 200
    return run_id, token, run_config


def test_an_update_that_got_no_answer_is_re_sent_not_retrained(
    model_url: str, coordinator_url: str, relay: Callable[[str], Relay], tmp_path: Path
) -> None:
    """The POST of a round's update gets no answer (the network drops it; the retry budget runs out)
    and the site's loop is run again: the coordinator hands out the same round and state, and the
    client re-sends the update it already computed, byte for byte, without another call to the
    inference service. Catches a client that trains the round again (``SiteClient.handle_train``
    without its check of the updates already sent)."""
    run_id, token, _ = _one_site_run(coordinator_url, "org-resend")
    network = relay(coordinator_url)
    network.lose = lambda method, path: method == "POST" and path.endswith("/updates")
    lossy = RetryPolicy(total_s=0.5, initial_s=0.1, max_backoff_s=0.2)
    coordinator = JsonService("coordinator", network.url, token=token, retry=lossy)
    model = JsonService("model service", model_url, timeout_s=120)
    data = load_labeled_texts(str(write_jsonl(tmp_path / "site.jsonl", SST2_SAMPLE)))
    with coordinator, model:
        site = SiteClient(CoordinatorService(coordinator), ModelService(model), data, poll_wait_s=0)
        with pytest.raises(ServiceUnavailable, match="updates"):
            site.run()
        assert network.lost and not network.bodies("POST", "/updates")  # nothing reached the coordinator
        trained = model.traffic.copy()
        assert trained.calls > 0

        network.lose = lambda method, path: False
        assert site.run() is None  # the run finishes (no test data, no validation split to report)
        assert model.traffic.since(trained).calls == 0  # not trained again
    sent = network.bodies("POST", "/updates")
    assert sent == [network.lost[0][2]]  # once, the very bytes that were lost
    with httpx.Client(base_url=coordinator_url, headers=HEADERS, timeout=30) as admin:
        assert admin.get(f"/v1/runs/{run_id}").json()["state"] == "finished"
        rounds = _rounds(admin.get(f"/v1/runs/{run_id}/rounds").json())
    assert [[p["name"] for p in r["participants"]] for r in rounds] == [["org-resend"]]


def test_scope_all_sends_the_template_perturbation_with_every_perturbed_score(
    model_url: str, coordinator_url: str, relay: Callable[[str], Relay], tmp_path: Path
) -> None:
    """``perturb_scope: all``: every perturbed score call of a round (one per generation, one for
    the final mean) carries ``perturb_template`` with the run's rate and the round's seed next to
    the perturbed input ids, and the clean calls carry none; read from the requests the client
    really sent to the inference service. Catches a client that perturbs the inputs but drops the
    template part on the way (the perturbed copy scored without its ``template``)."""
    _, token, config = _one_site_run(coordinator_url, "org-all", perturb_scope="all", perturb_rate=0.5)
    network = relay(model_url)
    coordinator = JsonService("coordinator", coordinator_url, token=token)
    model = JsonService("model service", network.url, timeout_s=120)
    data = load_labeled_texts(str(write_jsonl(tmp_path / "site.jsonl", SST2_SAMPLE)))
    with coordinator, model:
        site = SiteClient(CoordinatorService(coordinator), ModelService(model), data, poll_wait_s=0)
        assert site.run() is None
        vocab_size = site.model.info().vocab_size
    # The client scores against registered inputs: each call's ids are those of its handle.
    registered = [InputsRegistration.model_validate_json(b) for b in network.bodies("POST", "/v1/inputs")]
    ids_of = {r.handle: r.input_ids() for r in registered}
    scores = [HandleScoreRequest.model_validate_json(b) for b in network.bodies("POST", "/v1/score/handle")]
    assert len(scores) == config.local_iters + 1  # a call per generation, one for the final mean
    assert len(registered) == 2  # the clean and the round's perturbed copy, once each
    assert all(len(r.parts) == 2 for r in scores)  # the candidates scored on both in one call
    clean = [r.parts[0] for r in scores]
    perturbed = [r.parts[1] for r in scores]
    assert all(p.perturb_template is None for p in clean)
    ids = ids_of[clean[0].handle]
    assert all(p.handle == clean[0].handle for p in clean)
    # What the round's copy is (scope all: replacements from the whole vocabulary, no specials kept).
    expected = Perturber(vocab_size, (), config.perturb_rate, "all").copy(ids, config.seed, 0, "org-all")
    assert expected.template is not None and expected.template.rate == 0.5
    for request in perturbed:
        assert request.perturb_template == expected.template
        assert ids_of[request.handle] == expected.input_ids != ids


def _federate(model_url: str, coordinator_url: str, tmp_path: Path, test_rows: list[tuple[str, int]]) -> str:
    """A 3-round run of two client processes whose test files hold ``test_rows``; the run id."""
    config = RunConfig(
        name="selection", rounds=3, min_clients=2, round_timeout_s=300, task="sst2",
        projection={"seed": 11, "intrinsic_dim": 16, "prompt_length": 4},  # type: ignore[arg-type]
        local_popsize=4, local_iters=2, max_input_tokens=32, eval_every=1, val_share=0.5,
    )  # fmt: skip
    with httpx.Client(base_url=coordinator_url, headers=HEADERS, timeout=30) as admin:
        run_id: str = admin.post("/v1/runs", json=config.model_dump(mode="json")).json()["run_id"]
        tokens = [
            admin.post(f"/v1/runs/{run_id}/clients", json={"name": f"org-{k}"}).json()["token"]
            for k in range(2)
        ]
        assert admin.post(f"/v1/runs/{run_id}/start").status_code == 200
    _run_clients(
        model_url, coordinator_url, tmp_path, tokens, write_jsonl(tmp_path / "test.jsonl", test_rows)
    )
    return run_id


def test_a_poisoned_test_split_does_not_change_the_selected_prompt(
    model_url: str, coordinator_url: str, tmp_path: Path
) -> None:
    """Selection never reads test data: the same federation run twice, once with every test label
    flipped, hands out the same state and the same z, while its test accuracies differ."""
    clean = _federate(model_url, coordinator_url, tmp_path / "clean", SST2_SAMPLE)
    flipped = [(text, 1 - label) for text, label in SST2_SAMPLE]
    poisoned = _federate(model_url, coordinator_url, tmp_path / "poisoned", flipped)
    with httpx.Client(base_url=coordinator_url, headers=HEADERS, timeout=30) as admin:
        a, b = (
            PromptResponse.model_validate_json(admin.get(f"/v1/runs/{r}/prompt").content)
            for r in (clean, poisoned)
        )
        accuracy = [
            [r["test_accuracy"] for r in admin.get(f"/v1/runs/{run}/rounds").json()]
            for run in (clean, poisoned)
        ]
    assert a.chosen == b.chosen == "selected" and a.round == b.round
    assert np.array_equal(a.z.numpy(), b.z.numpy()) and a.val_loss == b.val_loss
    assert accuracy[0] == pytest.approx([1 - x for x in accuracy[1]])  # the poison reached the test metrics
