"""FedBPT on a real Flower deployment equals FedBPT on fedbpt's own coordinator.

Every role is a real process on 127.0.0.1: one ``fedbpt serve-model`` per site on a tiny random
BERT (its own service per site, so that no service merges two sites' requests into one forward
pass: how rows are batched changes logits in their last bits, docs/development.md), then

1. fedbpt's coordinator with three ``fedbpt client`` processes (sites ``site-0..2``), and
2. ``flower-superlink``, three ``flower-supernode`` processes (the same site names, data and
   model endpoints in their node config) and ``flwr run`` of the app in flower_app/app,

for the same run config (per-client seeds, three rounds). The global state after the last round
(mean, sigma, covariance and pycma's bookkeeping), every round's sigma and the selected prompt are
the same up to ``rtol=1e-9`` (both drivers run the same client step against the same service
processes with the same requests, so they agree to the last bit; the margin keeps the test
independent of how a BLAS build rounds; a wrong seed or order moves the state by about sigma). The
tuned prompt Flower wrote is scored by ``fedbpt evaluate --run-prompt``.

And only the inference services load weights: every Python process of the test (the Flower
processes' children included: SuperExec, ClientApp and ServerApp processes) records through an
audit hook (tests/flower/audit/sitecustomize.py) whether it imported torch, transformers or
safetensors or opened a file in the model's folder; only the ``serve-model`` processes did.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest

from coordinator.store import Store
from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port
from fedbpt_cli.services import LocalFederation
from flower_app import checkpoint, tracking
from flower_app.config import run_config_to_flower
from flower_app.strategy import PROMPT_FILE
from flower_app.template import TEMPLATE, toml_value
from protos import ProjectionSpec, PromptResponse, RoundRecord, RunConfig
from tests.clients.conftest import SST2_SAMPLE, write_jsonl
from tests.flower.test_strategy import assert_same_state

REPO = Path(__file__).resolve().parents[2]
AUDIT = Path(__file__).resolve().parent / "audit"
BIN = Path(sys.executable).parent
SITES = 3
CONFIG = RunConfig(
    rounds=3,
    local_iters=3,
    local_popsize=4,
    projection=ProjectionSpec(intrinsic_dim=16, prompt_length=4),
    max_input_tokens=32,
    client_seeds="per_client",
    eval_every=1,
)
RTOL, ATOL = 1e-9, 1e-12


def site_files(folder: Path) -> tuple[list[Path], Path]:
    """Three sites of different sizes (so sample weights differ) and a test file."""
    parts = [SST2_SAMPLE[0:4], SST2_SAMPLE[4:9], SST2_SAMPLE[9:12] + SST2_SAMPLE[0:3]]
    files = [write_jsonl(folder / f"site-{k}.jsonl", rows) for k, rows in enumerate(parts)]
    return files, write_jsonl(folder / "test.jsonl", SST2_SAMPLE)


def wait_port(proc: ManagedProcess, port: int, timeout: float = 120.0) -> None:
    """Until something accepts connections on ``port`` (a readiness wait, not an assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.alive(), f"{proc.name} exited:\n{proc.log_tail()}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} did not listen on {port}:\n{proc.log_tail()}")


def started(stack: ExitStack, proc: ManagedProcess) -> ManagedProcess:
    proc.start()
    stack.callback(proc.stop)
    return proc


def serve_models(stack: ExitStack, model: Path, logs: Path) -> tuple[list[ManagedProcess], list[str]]:
    """One inference service per site, started (not yet ready: see :func:`wait_ready`)."""
    urls, procs = [], []
    for k in range(SITES):
        port = free_port()
        argv = fedbpt_command(
            "serve-model", "--model", str(model), "--port", str(port), "--device", "cpu",
            "--threads", "1", "--log-level", "warning",
        )  # fmt: skip
        procs.append(started(stack, ManagedProcess(f"serve-model-{k}", argv, logs / f"serve-model-{k}.log")))
        urls.append(f"http://127.0.0.1:{port}")
    return procs, urls


def wait_ready(procs: list[ManagedProcess], urls: list[str]) -> None:
    for proc, url in zip(procs, urls, strict=True):
        proc.wait_http(f"{url}/readyz", timeout=300)


def coordinator_run(
    workdir: Path, urls: list[str], files: list[Path], test: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, str, PromptResponse, list[RoundRecord]]:
    """FedBPT on fedbpt's coordinator: (its database, the run id, the selected prompt, the rounds)."""
    fed = LocalFederation(workdir=workdir)
    try:
        fed.start_services(model_url=urls[0])
        run_id, tokens = fed.create_run(CONFIG, SITES)  # enrols site-0, site-1, site-2
        for k, token in enumerate(tokens):
            fed.model_url = urls[k]  # each site its own service (start_client reads it per call)
            fed.start_client(k, token, files[k], test, poll_wait=1.0)
        fed.start_run(run_id)
        for client in fed.clients:
            assert client.wait(timeout=600) == 0, client.log_tail()
        with fed.admin() as http:
            prompt = PromptResponse.model_validate_json(http.get(f"/v1/runs/{run_id}/prompt").content)
            rounds = [RoundRecord.model_validate(r) for r in http.get(f"/v1/runs/{run_id}/rounds").json()]
        # The coordinator's rounds as TensorBoard scalars (flower_app/tracking.py's other driver).
        monkeypatch.setenv("FEDBPT_ADMIN_TOKEN", fed.admin_token)
        tensorboard = workdir / "tensorboard"
        assert (
            tracking.main(
                ["--coordinator", fed.coordinator_url, "--run", run_id, "--tensorboard", str(tensorboard)]
            )
            == 0
        )
        (events,) = tensorboard.glob("events.out.tfevents.*")
        assert count_records(events) == 1 + CONFIG.rounds
    finally:
        fed.stop()
    return workdir / "coordinator.sqlite", run_id, prompt, rounds


def flower_nodes(stack: ExitStack, workdir: Path, urls: list[str], files: list[Path], test: Path) -> Path:
    """A SuperLink and one SuperNode per site; returns the folder of the Flower CLI's config."""
    logs = workdir / "logs"
    port = free_port()
    argv = [str(BIN / "flower-superlink"), "--insecure", "--port", str(port)]
    argv.append("--disable-runtime-dependency-installation")  # fedbpt is installed, not fetched per run
    superlink = started(stack, ManagedProcess("flower-superlink", argv, logs / "superlink.log", cwd=workdir))
    wait_port(superlink, port)
    for k in range(SITES):
        node_config = f'site-name="site-{k}" model-endpoint="{urls[k]}" data="{files[k]}" test-data="{test}"'
        argv = [
            str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
            "--port", str(free_port()), "--node-config", node_config,
        ]  # fmt: skip
        started(
            stack, ManagedProcess(f"flower-supernode-{k}", argv, logs / f"supernode-{k}.log", cwd=workdir)
        )
    home = Path(os.environ["FLWR_HOME"])  # the audited fixture's: Flower's state stays in tmp_path
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    return home


def flower_run(stack: ExitStack, workdir: Path, home: Path) -> Path:
    """``flwr run`` of the app for CONFIG; returns the strategy's checkpoint folder."""
    ckpt = workdir / "flower-run"
    settings = {
        "sites": SITES,
        "checkpoint-dir": str(ckpt),
        "tensorboard-dir": str(workdir / "tensorboard"),
        **run_config_to_flower(CONFIG),
    }
    overrides = " ".join(f"{key}={toml_value(value)}" for key, value in settings.items() if value is not None)
    run = ManagedProcess(
        "flwr-run",
        [str(BIN / "flwr"), "run", str(TEMPLATE.parent), "--stream", "--run-config", overrides],
        workdir / "logs" / "flwr-run.log",
        env={"FLWR_HOME": str(home)},
        cwd=workdir,
    )
    started(stack, run)
    assert run.wait(timeout=600) == 0, run.log_tail()
    return ckpt


def count_records(path: Path) -> int:
    """The number of events in an event file, read (checksums checked) by TensorBoard's loader."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    return sum(1 for _ in LegacyEventFileLoader(str(path)).Load())


@pytest.fixture
def audited(tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every process started from here on runs the audit hook; yields the audit log's path."""
    log = tmp_path / "audit.log"
    path = os.pathsep.join([str(AUDIT), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("FEDBPT_AUDIT_LOG", str(log))
    monkeypatch.setenv("FEDBPT_AUDIT_MODEL_DIR", str(tiny_bert_dir.resolve()))
    # Flower starts its helpers (flower-superexec, flwr-clientapp, flwr-serverapp) by name.
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))  # not the user's ~/.flwr
    yield log


def audit_records(log: Path) -> dict[int, tuple[str, set[str]]]:
    """{pid: (command line, {event:detail})} of every audited process."""
    seen: dict[int, tuple[str, set[str]]] = {}
    events: dict[int, set[str]] = defaultdict(set)
    for line in log.read_text().splitlines():
        pid, event, detail, argv = line.split("\t", 3)
        events[int(pid)].add(f"{event}:{detail}" if event != "start" else "start")
        seen.setdefault(int(pid), (argv, events[int(pid)]))
    return seen


@pytest.mark.timeout(900)
def test_flower_run_equals_the_coordinator_run(
    tmp_path: Path, tiny_bert_dir: Path, audited: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files, test = site_files(tmp_path / "data")
    with ExitStack() as stack:
        # Everything starts at once (the Flower nodes idle until the run); the two runs one after
        # the other, so that each service serves one site at a time.
        services, urls = serve_models(stack, tiny_bert_dir, tmp_path / "logs")
        (tmp_path / "flower").mkdir()
        home = flower_nodes(stack, tmp_path / "flower", urls, files, test)
        wait_ready(services, urls)
        t0 = time.monotonic()
        db, run_id, expected_prompt, expected_rounds = coordinator_run(
            tmp_path / "coordinator", urls, files, test, monkeypatch
        )
        t1 = time.monotonic()
        ckpt = flower_run(stack, tmp_path / "flower", home)
        t2 = time.monotonic()

        progress = checkpoint.load(ckpt, CONFIG)
        assert progress is not None and progress.round == CONFIG.rounds and progress.final_evaluated
        store = Store(db)
        try:
            _, expected_state = store.load_state(run_id)
        finally:
            store.close()
        # The figures the docs quote (`pytest -s`): how far apart the two drivers' states are, and
        # how long each took for the same run (asserted on nothing but the tolerance below).
        print(
            f"\nflower vs coordinator: max |mean difference| "
            f"{np.max(np.abs(progress.state.mean - expected_state.mean)):.3g}, sigma difference "
            f"{abs(progress.state.sigma - expected_state.sigma):.3g}; wall: coordinator run "
            f"{t1 - t0:.1f} s, Flower run {t2 - t1:.1f} s"
        )
        assert_same_state(progress.state, expected_state)
        sigmas = [r.sigma_after for r in progress.rounds]
        np.testing.assert_allclose(sigmas, [r.sigma_after for r in expected_rounds], rtol=RTOL)
        assert [r.used for r in progress.rounds] == [["site-0", "site-1", "site-2"]] * CONFIG.rounds
        # The ServerApp wrote each round to TensorBoard as it closed (contents: test_tracking.py):
        # the file version, one record per round, the final test accuracy.
        (events,) = (tmp_path / "flower" / "tensorboard").glob("events.out.tfevents.*")
        assert count_records(events) == 1 + CONFIG.rounds + 1

        prompt = PromptResponse.model_validate_json((ckpt / PROMPT_FILE).read_bytes())
        assert (prompt.round, prompt.chosen) == (expected_prompt.round, expected_prompt.chosen)
        assert prompt.val_loss == pytest.approx(expected_prompt.val_loss, rel=RTOL)
        np.testing.assert_allclose(prompt.z.numpy(), expected_prompt.z.numpy(), rtol=RTOL, atol=ATOL)

        argv = fedbpt_command(
            "evaluate", "--model-endpoint", urls[0], "--run-prompt", str(ckpt / PROMPT_FILE),
            "--task", "sst2", "--data", str(test),
        )  # fmt: skip
        evaluate = ManagedProcess("evaluate", argv, tmp_path / "logs" / "evaluate.log")
        assert started(stack, evaluate).wait(timeout=300) == 0, evaluate.log_tail()
        assert "accuracy" in evaluate.log_tail().lower()
        assert httpx.get(f"{urls[0]}/readyz").status_code == 200

    records = audit_records(audited)
    loaded = {pid: argv for pid, (argv, ev) in records.items() if ev - {"start"}}
    services = {pid for pid, (argv, _) in records.items() if " serve-model " in f"{argv} "}
    assert len(services) == SITES and all(
        any(e.startswith("import:torch") for e in records[p][1]) for p in services
    )
    assert set(loaded) == services, {pid: loaded[pid] for pid in set(loaded) - services}
    # The hook ran in the Flower processes too: one ClientApp process per message, and the ServerApp.
    clientapps = [argv for argv, _ in records.values() if "flwr-clientapp" in argv]
    assert len(clientapps) >= SITES * (CONFIG.rounds + 2)  # query, train per round, evaluate
    assert any("flwr-serverapp" in argv for argv, _ in records.values())
