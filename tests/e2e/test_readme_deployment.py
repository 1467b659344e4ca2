"""The README's "A deployment by hand", run from the README text itself with real processes.

The block between ``<!-- readme-deployment:start -->`` and ``<!-- readme-deployment:end -->`` is
run by bash in an empty folder, as a user pastes it, with only what a test must change: free ports
for 8000 and 8080 (so that it cannot collide with anything), and the shared data's path for
``../shared/data``. It must finish (every command succeeding), the run must have finished with both
sites, the handed-out prompt must parse, and ``fedbpt evaluate`` must have printed its table.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from fedbpt_cli.procs import free_port
from protos import PromptResponse

REPO = Path(__file__).resolve().parents[2]


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(
        r"<!-- readme-deployment:start -->\n```bash\n(.*?)```\n<!-- readme-deployment:end -->", text, re.S
    )
    assert found, "the README lost its deployment block (or its markers)"
    return found.group(1)


def test_the_readme_deployment_runs_as_printed(shared_data: Path, tmp_path: Path) -> None:
    model_port, coordinator_port = free_port(), free_port()
    script = (
        readme_block()
        .replace("8000", str(model_port))
        .replace("8080", str(coordinator_port))
        .replace("../shared/data", str(shared_data))
    )
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("FEDBPT_ADMIN_TOKEN", None)
    output = tmp_path / "readme-deployment.out"
    with output.open("w") as sink:
        # Output to a file, not a pipe: the services it starts in the background hold their copy,
        # and a pipe would stay open until they exit.
        proc = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # every process it starts can be stopped with it
        )
        try:
            proc.wait(timeout=800)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    out = output.read_text()
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in tmp_path.glob("site-*.log"))
    assert proc.returncode == 0, f"{out[-4000:]}\n{logs}"
    info = json.loads(out[out.index('{\n    "run_id"') : out.index("\n}\n") + 2])
    assert info["state"] == "finished" and info["clients"] == 2, info
    prompt = PromptResponse.model_validate_json((tmp_path / "prompt.json").read_text())
    assert prompt.chosen == "selected" and prompt.task == "sst2" and 0 <= prompt.round <= 3
    assert re.search(r"accuracy: 0\.\d+ \(\d+/872\)", out), out[-3000:]  # fedbpt evaluate's line
