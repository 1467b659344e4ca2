"""``fedbpt experiment`` end to end: a tiny grid through the real services (a tiny random
sentence-transformers model saved and loaded with from_pretrained, real coordinator and client
processes on 127.0.0.1), the white-box baseline in process, records, resume and the document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedbpt_cli.experiments.records import read_records
from fedbpt_cli.procs import ManagedProcess, fedbpt_command

GRID = """
seeds: [0, 1]
clients: 2
k_shot: 6
partitions: [iid, 0.5]
methods: [zero_shot, centralized_bbt, fedbpt, fedavg_bbt, fedprompt]
run:
  projection: {{seed: 7, intrinsic_dim: 8, prompt_length: 2}}
  local_popsize: 3
  local_iters: 1
  round_timeout_s: 300
  val_share: 0.0  # every example trains: centralized BBT and the federation score the same rows
datasets:
  tiny:
    data: tiny
    run: {{task: sst2, rounds: 2, max_input_tokens: 16, eval_every: 1}}
whitebox: {{lr: 0.05, local_steps: 2, memory_check: {memory}}}
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    root = tmp_path_factory.mktemp("experiment-data")
    (root / "tiny").mkdir()
    for split, rows in (("train", 200), ("test", 24)):
        lines = (shared_data / "sst2" / f"{split}.jsonl").read_text().splitlines()[:rows]
        (root / "tiny" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def run_experiment(tmp: Path, model: Path, data: Path, *extra: str, memory: bool = False) -> tuple[int, str]:
    grid = tmp / "grid.yaml"
    grid.write_text(GRID.format(memory=str(memory).lower()))
    argv = fedbpt_command(
        "experiment", str(grid), "--data", str(data), "--out", str(tmp / "out"),
        "--records", str(tmp / "records"), "--doc", str(tmp / "doc" / "results.md"),
        "--model", str(model), "--jobs", "2", *extra,
    )  # fmt: skip
    proc = ManagedProcess("experiment", argv, tmp / "experiment.log")
    proc.start()
    code = proc.wait(timeout=1500)
    return code, (tmp / "experiment.log").read_text()


@pytest.mark.timeout(1800)
def test_grid_runs_resumes_and_writes_the_document(
    tmp_path: Path, tiny_st_dir: Path, tiny_data: Path
) -> None:
    code, log = run_experiment(tmp_path, tiny_st_dir, tiny_data, memory=True)
    assert code == 0, log[-4000:]
    records = {r.cell.key: r for r in read_records(tmp_path / "records")}
    # 1 zero-shot + per seed (1 centralized + 2 partitions x 3 split-dependent methods) = 15 cells
    assert len(records) == 1 + 2 * (1 + 2 * 3)
    assert all(r.status == "ok" for r in records.values())

    for key, r in records.items():
        assert r.test_size == 24, key
        if r.cell.method != "zero_shot":
            assert r.rounds == 2, key
            # Scored on the whole test set: a whole number of the 24 examples.
            final = r.final_accuracy
            assert final is not None and 0 <= final <= 1, key
            assert final * 24 == pytest.approx(round(final * 24), abs=1e-6), (key, final)
            assert [s for s, _ in r.curve] == [0, 1, 2], key  # eval_every 1: every state
            assert r.best_accuracy == max(a for _, a in r.curve), key
            if r.cell.method != "fedprompt":  # the white-box baseline hands out its final prompt
                # No validation split here (val_share 0): the run hands out its final state.
                assert (r.selected_state, r.selected_accuracy) == (2, r.final_accuracy), key

    # The white-box baseline scores through the service's own code: with its zero prompt it gives
    # the very accuracy the black-box clients measured for state 0 (z = 0) on the same test set.
    for seed in (0, 1):
        for part in ("iid", "dir0.5"):
            white = records[f"tiny__{part}__fedprompt__seed{seed}"].curve[0][1]
            black = records[f"tiny__{part}__fedbpt__seed{seed}"].curve[0][1]
            assert white == pytest.approx(black, abs=1e-9)

    # Centralized BBT: one site with all the data and the same model queries per round as the
    # federation without perturbation; FedBPT's perturbation doubles the generation scorings.
    central = records["tiny__all__centralized_bbt__seed0"]
    fedavg = records["tiny__iid__fedavg_bbt__seed0"]
    fedbpt = records["tiny__iid__fedbpt__seed0"]
    assert central.clients == 1 and fedavg.clients == 2
    assert central.model_rows == fedavg.model_rows > 0
    assert fedbpt.model_rows > fedavg.model_rows
    assert fedbpt.bytes_per_client_per_round["client_to_coordinator"] > 0
    assert fedbpt.client_peak_rss_bytes and fedbpt.client_peak_rss_bytes > 10 * 2**20

    memory = json.loads((tmp_path / "records" / "_memory.json").read_text())
    assert memory["whitebox_client_peak_rss_bytes"] > 10 * 2**20

    doc = (tmp_path / "doc" / "results.md").read_text()
    assert (tmp_path / "doc" / "results" / "tiny.png").stat().st_size > 5000
    fed = [records[f"tiny__iid__fedbpt__seed{s}"].selected_accuracy for s in (0, 1)]
    mean = sum(a for a in fed if a is not None) / 2
    assert f"| FedBPT | {100 * mean:.2f} ± " in doc
    assert "## Communication" in doc and "Llama-2-7B" in doc and "| white-box client (MiniLM" in doc

    # Resume: every cell is recorded, so a second invocation runs none and leaves them as they were.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "records").glob("*.json")}
    code, log = run_experiment(tmp_path, tiny_st_dir, tiny_data)
    assert code == 0, log[-4000:]
    assert "0 cell(s) to run" in log
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "records").glob("*.json")} == before


def test_a_bad_grid_file_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text("seeds: [0]\npartitions: [iid, -1.0]\ndatasets: {x: {data: x}}\n")
    argv = fedbpt_command(
        "experiment", str(grid), "--out", str(tmp_path / "out"), "--records", str(tmp_path / "rec")
    )
    proc = ManagedProcess("experiment", argv, tmp_path / "log")
    proc.start()
    assert proc.wait(timeout=120) == 2
    assert "Dirichlet alpha" in (tmp_path / "log").read_text()
    assert not (tmp_path / "out").exists() and not (tmp_path / "rec").exists()
