"""Bytes on the client <-> inference service link per client and round, before and after the lean
link (registered inputs + handle calls), measured by the clients' own counters
(``ClientMetrics.service_bytes_sent/received``: the lengths of the real bodies).

Runs ``fedbpt simulate`` three times on the same federation: with ``FEDBPT_INPUT_HANDLES=false``
and ``FEDBPT_COMPACT_ANSWERS=false`` (every score call carries its ids, the logits come back as JSON:
the link before it was made lean), with handles and JSON answers, and with the defaults (handles,
logits as binary score frames); prints the mean bytes per client and round each way and the ratios.

    python benchmarks/bench_lean_link.py --data ../shared/data/ag_news --out runs/bench-lean
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run(
    data: str, out: Path, handles: bool, frames: bool, args: argparse.Namespace
) -> dict[str, list[float]]:
    """Mean bytes per client in each round, each way: {"client_to_service": [round 0, ..], ..}."""
    env = {
        **os.environ,
        "FEDBPT_INPUT_HANDLES": "true" if handles else "false",
        "FEDBPT_COMPACT_ANSWERS": "true" if frames else "false",
    }
    argv = [
        sys.executable, "-c", "from fedbpt_cli.main import app; app()", "simulate",
        "--task", args.task, "--data", data, "--out", str(out), "--clients", str(args.clients),
        "--rounds", str(args.rounds), "--k-shot", str(args.k_shot), "--max-input-tokens", "64",
        "--eval-every", str(args.eval_every), "--test-limit", str(args.test_limit), "--seed", "1",
        "--intrinsic-dim", str(args.intrinsic_dim), "--prompt-length", str(args.prompt_length), "--overwrite",
    ]  # fmt: skip
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    per: dict[str, list[float]] = {"client_to_service": [], "service_to_client": []}
    for record in report["rounds"]:
        parts = record["participants"]
        per["client_to_service"].append(sum(p["metrics"]["service_bytes_sent"] for p in parts) / len(parts))
        per["service_to_client"].append(
            sum(p["metrics"]["service_bytes_received"] for p in parts) / len(parts)
        )
    return per


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data/ag_news")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-lean"))
    parser.add_argument("--task", default="ag_news")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--k-shot", type=int, default=8, help="per class, whole federation (8 x 4 / 2 = 16 a site)"
    )
    parser.add_argument(
        "--test-limit", type=int, default=400, help="test sentences, whole federation (200 a site)"
    )
    parser.add_argument("--eval-every", type=int, default=2, help="rounds between test evaluations (0: none)")
    parser.add_argument("--intrinsic-dim", type=int, default=100, help="d (the grid's 100)")
    parser.add_argument("--prompt-length", type=int, default=5, help="L (the grid's 5)")
    args = parser.parse_args()
    runs = {
        "stateless": run(args.data, args.out / "stateless", False, False, args),
        "handles": run(args.data, args.out / "handles", True, False, args),
        "frames": run(args.data, args.out / "frames", True, True, args),
    }
    before = runs["stateless"]
    print(f"{args.task}, {args.clients} clients x {args.rounds} rounds, {args.k_shot} shots per class")
    print(
        "bytes per client and round (ClientMetrics): stateless + JSON -> handles + JSON -> handles + frames"
    )
    print(f"{'round':<6} {'link':<20} {'stateless':>12} {'handles':>12} {'frames':>12} {'ratio':>8}")
    for r in range(len(before["client_to_service"])):
        for key in ("client_to_service", "service_to_client"):
            b, h, f = (runs[name][key][r] for name in ("stateless", "handles", "frames"))
            print(f"{r:<6} {key:<20} {b:>12,.0f} {h:>12,.0f} {f:>12,.0f} {b / f:>7.2f}x")
    for key in ("client_to_service", "service_to_client"):
        b, h, f = (sum(runs[n][key]) / len(runs[n][key]) for n in ("stateless", "handles", "frames"))
        print(f"{'mean':<6} {key:<20} {b:>12,.0f} {h:>12,.0f} {f:>12,.0f} {b / f:>7.2f}x")


if __name__ == "__main__":
    main()
