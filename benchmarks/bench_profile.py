"""Where a ``fedbpt serve-model`` process spends its time under a stream of score requests: a
sampling profile (py-spy, every thread of the real process) grouped into the stages of a request.

For each model (a tiny random sentence-transformer, whose forward is negligible, and the embedded
MiniLM) and request size (the results grid's P=5 x B=16, d=100, L=5; and P=20 x B=32, d=500, L=50),
one client sends the same kind of body to a real service process (uvicorn, the scheduler's model
thread) while py-spy samples it; each sample is put in the stage of the deepest frame of ours on
its stack (or, with none, of the library it is in):

    HTTP server (uvicorn, starlette)  | body parsing and validation (FastAPI, pydantic, json)
    middleware (auth, size limits)    | array decode (base64, protos/arrays.py)
    request preparation (task, vocab) | projection (A z + p0)
    tokenisation and row building     | prompt injection (embedding rows)
    model forward (torch.nn modules)  | label-logit extraction (gathers after the forward)
    scheduling (queue, worker)        | response encoding (Array.from_numpy, JSON)
    other

It prints one table per (model, size): samples, share of the samples, and the milliseconds per
request they stand for (samples / rate / requests; idle waits in select() left out), and writes the raw
collapsed stacks (py-spy ``raw`` format; any flame-graph tool draws them) and the tables to
``--out``. ``docs/profile.md`` is this script's output on the 2-core development machine.
Nothing is asserted. Needs ``py-spy`` (in the dev extra) and permission to attach to a child
process (default on Linux; in some containers ptrace is off).

    .venv/bin/python benchmarks/bench_profile.py [--requests 200] [--threads 1] [--out runs/profile]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_overhead import DATA, SIZES, request_bodies  # noqa: E402

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running  # noqa: E402

# (stage, file fragment, function names or None for any): the deepest matching frame of ours decides.
OURS: list[tuple[str, str, frozenset[str] | None]] = [
    (
        "array decode (base64, protos/arrays.py)",
        "protos/arrays.py",
        frozenset({"_decode", "decode_array", "numpy"}),
    ),
    ("response encoding (Array.from_numpy, JSON)", "protos/arrays.py", None),
    ("response encoding (Array.from_numpy, JSON)", "inference_service/app.py", frozenset({"_answer"})),
    ("middleware (auth, size limits)", "inference_service/middleware.py", None),
    ("scheduling (queue, worker)", "inference_service/scheduler.py", None),
    ("projection (A z + p0)", "inference_service/projection.py", None),
    ("prompt injection (embedding rows)", "inference_service/backends/base.py", None),
    ("tokenisation and row building", "inference_service/rows.py", None),
    ("tokenisation and row building", "inference_service/text.py", None),
    ("tokenisation and row building", "inference_service/tasks.py", None),
    ("request preparation (task, vocab)", "inference_service/scoring.py", None),
    ("request preparation (task, vocab)", "inference_service/numeric.py", None),
    ("model forward (torch.nn modules)", "inference_service/backends/", None),
]
# With no frame of ours on the stack: by library.
LIBRARIES: list[tuple[str, tuple[str, ...]]] = [
    ("body parsing and validation (FastAPI, pydantic, json)", ("pydantic", "fastapi/", "json/")),
    ("HTTP server (uvicorn, starlette)", ("uvicorn", "starlette", "h11", "httptools", "anyio", "asyncio")),
]
FORWARD_LIBRARIES = ("torch/nn/modules", "transformers/models", "sentence_transformers/models")


def frames(stack: str) -> list[str]:
    """py-spy raw frames, root first: ``function (path:line)``."""
    return [f for f in stack.split(";") if f]


IDLE = "idle"  # the event loop waiting in select(): not work, left out of the tables


def stage_of(stack: list[str]) -> str:
    if stack and stack[-1].startswith(("EpollSelector.select", "select (")):
        return IDLE
    if any("call_soon_threadsafe" in f for f in stack):  # the model thread waking the event loop
        return "scheduling (queue, worker)"
    ours = [f for f in stack if "inference_service/" in f or "protos/" in f]
    for frame in reversed(ours):
        function = frame.split(" (", 1)[0]
        for stage, fragment, functions in OURS:
            if fragment in frame and (functions is None or function in functions):
                if stage.startswith("model forward"):
                    below = stack[stack.index(frame) + 1 :]
                    if not any(lib in f for f in below for lib in FORWARD_LIBRARIES):
                        return "label-logit extraction (gathers after the forward)"
                return stage
    for stage, fragments in LIBRARIES:
        if any(fragment in f for f in stack for fragment in fragments):
            return stage
    return "other"


def parse_raw(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[stage_of(frames(stack))] += int(n)
    counts.pop(IDLE, None)
    return counts


def profile_stream(
    model: str, bodies: list[bytes], threads: int, out: Path, rate: int
) -> tuple[Counter[str], float]:
    """Send ``bodies`` one after another to a fresh service while py-spy samples it."""
    port = free_port()
    argv = fedbpt_command(
        "serve-model", "--model", model, "--port", str(port), "--device", "cpu", "--dtype", "float32",
        "--threads", str(threads), "--log-level", "warning",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    raw = out.with_suffix(".txt")
    spy_bin = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with (
        running(ManagedProcess("serve-model", argv, out.with_suffix(".log")), ready_url=f"{url}/readyz", timeout=300) as proc,
        httpx.Client(base_url=url, timeout=300, headers={"content-type": "application/json"}) as http,
    ):  # fmt: skip
        for body in bodies[:3]:  # warm-up, not profiled: A, the anchors, kernels
            http.post("/v1/score", content=body).raise_for_status()
        spy = subprocess.Popen(
            [spy_bin, "record", "--pid", str(proc.pid), "--rate", str(rate), "--format", "raw", "--output", str(raw),
             "--nonblocking", "--threads"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(1.0)  # py-spy attaches
        started = time.perf_counter()
        for body in bodies:
            http.post("/v1/score", content=body).raise_for_status()
        wall = time.perf_counter() - started
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
    if not raw.exists():
        raise SystemExit(f"py-spy wrote no profile (attach refused?): {err.decode()[-500:]}")
    # --threads prefixes each stack with the thread: drop it, it is not a frame.
    counts = parse_raw(_strip_threads(raw))
    return counts, wall


def _strip_threads(raw: Path) -> Path:
    lines = [
        line.split(";", 1)[1] if line.startswith("thread (") else line
        for line in raw.read_text().splitlines()
    ]
    raw.write_text("\n".join(lines) + "\n")
    return raw


def table(counts: Counter[str], wall: float, requests: int, rate: int) -> list[str]:
    """Samples per stage as a share and as milliseconds of one request (samples / rate /
    requests: the time some thread of the service spent in that stage)."""
    total = sum(counts.values()) or 1
    lines = ["| stage | samples | share | ms per request |", "|---|---:|---:|---:|"]
    for stage, n in counts.most_common():
        lines.append(f"| {stage} | {n} | {n / total:.1%} | {1000 * n / rate / requests:.2f} |")
    lines += [
        f"| **all stages** | {total} | 100% | {1000 * total / rate / requests:.2f} |",
        f"| wall time of the stream / requests (client side, idle included) | | | {1000 * wall / requests:.2f} |",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the service")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--models", default="tiny,MiniLM")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "profile")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from inference_service.backends import load_backend
    from inference_service.random_models import build_random_model
    from inference_service.settings import ServiceSettings, default_model_path

    models = {"tiny": lambda: str(build_random_model("st-bert", Path(tempfile.mkdtemp(prefix="fedbpt-tiny-st-")))),
              "MiniLM": lambda: str(default_model_path())}  # fmt: skip
    texts = [json.loads(line)["text"] for line in (DATA / "sst2" / "test.jsonl").open()][:32]
    report = [
        f"torch threads {args.threads}; {args.requests} requests in a row per table; py-spy at {args.rate} Hz",
        "",
    ]
    for name in args.models.split(","):
        model = models[name]()
        ids = load_backend(ServiceSettings(model=model, device="cpu")).codec.encode_inputs(texts)
        for label, size in SIZES.items():
            bodies = request_bodies(ids, size, args.requests)
            slug = f"{name}-P{size[0]}xB{size[1]}"
            counts, wall = profile_stream(model, bodies, args.threads, args.out / slug, args.rate)
            block = [f"### {name}, {label}", "", *table(counts, wall, args.requests, args.rate), ""]
            print("\n".join(block), flush=True)
            report += block
    (args.out / "service.md").write_text("\n".join(report))
    print(f"wrote {args.out / 'service.md'} and the raw stacks beside it")


if __name__ == "__main__":
    main()
