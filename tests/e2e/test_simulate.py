"""``fedbpt simulate`` end to end: the inference service, the coordinator and the clients as real
processes on 127.0.0.1, driven by the CLI exactly as a user runs it."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fedbpt_cli.procs import fedbpt_command
from protos import PromptResponse

SMALL = [
    "--k-shot", "8", "--test-limit", "40", "--prompt-length", "4", "--intrinsic-dim", "16",
    "--local-popsize", "4", "--local-iters", "2", "--max-input-tokens", "24", "--eval-every", "1",
    "--seed", "7",
]  # fmt: skip


def _simulate(model: Path, data: Path, out: Path) -> subprocess.CompletedProcess[str]:
    argv = fedbpt_command(
        "simulate", "--clients", "2", "--rounds", "2", "--data", str(data), "--out", str(out),
        "--model", str(model), *SMALL,
    )  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def first_run(
    tiny_bert_dir: Path, sst2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("simulate") / "report"
    return out, _simulate(tiny_bert_dir, sst2_dir, out).stdout


def test_simulate_two_clients_two_rounds(first_run: tuple[Path, str]) -> None:
    out, stdout = first_run
    assert "zero-shot accuracy" in stdout
    assert re.search(r"round +1  clients 2  loss", stdout), stdout[-2000:]

    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary["state"] == "finished" and summary["rounds_completed"] == 2
    assert report["config"]["projection"]["intrinsic_dim"] == 16
    _check_accuracies(report, stdout)
    for link, value in summary["bytes_per_client_per_round"].items():
        assert value > 0, link
    for record in report["rounds"]:
        ids = [p["client_id"] for p in record["participants"]]
        assert len(ids) == 2 and len(set(ids)) == 2, record

    # prompt.json is what the run hands out (the selected state), prompt_final.json the last state,
    # whose global mean moved away from z0 = 0; both were scored on the whole test set.
    prompt = PromptResponse.model_validate_json((out / "prompt.json").read_text())
    assert prompt.chosen == "selected" and prompt.round == summary["selected_state"]
    assert 0 <= prompt.round <= 2
    final = PromptResponse.model_validate_json((out / "prompt_final.json").read_text())
    assert final.round == summary["final_state"] == 2
    assert final.z.numpy().shape == (16,) and np.linalg.norm(final.z.numpy()) > 0

    # Each client's update arrived exactly once per round, as the coordinator stored it.
    with sqlite3.connect(out / "coordinator.sqlite") as db:
        rows = db.execute(
            "SELECT round, client_id, COUNT(*) FROM updates GROUP BY round, client_id"
        ).fetchall()
    assert sorted((r, n) for r, _, n in rows) == [(0, 1), (0, 1), (1, 1), (1, 1)]

    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parts = sorted(p.name for p in (out / "data").iterdir())
    assert parts == ["client_0.jsonl", "client_1.jsonl", "test.jsonl", "test_0.jsonl", "test_1.jsonl"]


def _what_a_run_computed(out: Path) -> list[Any]:
    """Every number of the round records that the algorithm computes (no times, no ids)."""
    report = json.loads((out / "report.json").read_text())
    keep = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_accuracy", "test_loss")
    rounds = [
        (
            record["round"],
            {k: record.get(k) for k in ("val_loss", "test_accuracy", "sigma_after", "server_sigma")},
            sorted(
                (p["name"], p["n_samples"], p["fitness"], [p["metrics"].get(k) for k in keep])
                for p in record["participants"]
            ),
        )
        for record in report["rounds"]
    ]
    final = PromptResponse.model_validate_json((out / "prompt_final.json").read_text())
    return [rounds, final.z.numpy().tolist(), report["summary"]["selected_state"]]


def test_the_same_seeded_simulation_gives_identical_round_records(
    first_run: tuple[Path, str], tiny_bert_dir: Path, sst2_dir: Path, tmp_path: Path
) -> None:
    """Two runs of one seeded simulation on one machine: the same numbers, round by round, bit for
    bit (across machines the CPU's float kernels may differ in the last bits: docs/simulate.md)."""
    again = tmp_path / "again"
    _simulate(tiny_bert_dir, sst2_dir, again)
    assert _what_a_run_computed(again) == _what_a_run_computed(first_run[0])


def _check_accuracies(report: dict[str, Any], stdout: str) -> None:
    """The accuracies the report gives are shares of the 40 test examples, each state's the same
    wherever it was computed. Catches an accuracy out of range or over another denominator, a
    selected or final accuracy of another state, and a per-round curve that is not the clients'."""
    summary, rounds = report["summary"], report["rounds"]
    n = report["simulation"]["test_size"]
    assert n == 40
    for key in ("zero_shot_accuracy", "selected_accuracy", "final_accuracy"):
        correct = summary[key] * n  # scored on the whole test set: a whole number of examples
        assert 0 <= summary[key] <= 1 and correct == pytest.approx(round(correct), abs=1e-6), (key, summary)
    assert f"zero-shot accuracy: {summary['zero_shot_accuracy']:.4f}" in stdout
    if summary["selected_state"] == summary["final_state"]:
        assert summary["selected_accuracy"] == summary["final_accuracy"]
    # Each state as the clients scored it (eval_every 1) on their shards, which deal out the same
    # 40 examples: states 0 and 1 at the start of rounds 0 and 1, state 2 after the last round.
    for record in rounds:
        assert sum(p["metrics"]["n_test"] for p in record["participants"]) == n, record
    curve = [r["test_accuracy"] for r in rounds] + [rounds[-1]["final_test_accuracy"]]
    assert all(0 <= a <= 1 for a in curve), curve
    assert summary["initial_accuracy"] == curve[0]
    assert summary["best_accuracy"] == max(curve) == curve[summary["best_state"]]
    # The final state scored by the clients and by the simulation: the same examples and logits, in
    # other batches (a near-tie may round the other way on another batch layout: one example's slack).
    assert abs(curve[-1] - summary["final_accuracy"]) <= 1 / n + 1e-9, (curve, summary)


def test_ctrl_c_stops_every_process(tiny_bert_dir: Path, sst2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    argv = fedbpt_command(
        # Far more rounds than can finish before the signal: finishing would also exit 0.
        "simulate", "--clients", "2", "--rounds", "10000", "--data", str(sst2_dir), "--out", str(out),
        "--model", str(tiny_bert_dir), *SMALL,
    )  # fmt: skip
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
    # ignored: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    urls: list[str] = []
    started = False
    # A start that hangs is ended by SIGINT from a watchdog (the output then ends without the run's
    # line); no assertion on time.
    watchdog = threading.Timer(300, proc.send_signal, [signal.SIGINT])
    watchdog.start()
    try:
        for line in proc.stdout:
            found = re.findall(r"http://127\.0\.0\.1:\d+", line)
            if line.startswith("inference service"):
                urls = found
            if line.startswith("run "):
                started = True
                break
    finally:
        watchdog.cancel()
    assert started, "simulate never started the run"
    assert len(urls) == 2, urls
    for url in urls:
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    for url in urls:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == ["client-0.log", "client-1.log", "serve-coordinator.log", "serve-model.log"]
