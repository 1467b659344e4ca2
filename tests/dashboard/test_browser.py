"""The run dashboard in a real headless Chromium against a real coordinator with a finished run, and
both services' interactive API pages (/docs) with the network beyond the host cut off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running
from protos import PromptResponse
from tests.dashboard.conftest import ADMIN, ROUNDS, SELECTED, VAL_LOSS, FinishedRun

pytestmark = pytest.mark.browser


def _points(page: Any, chart: str) -> int:
    selector = f"[data-testid=chart-{chart}][data-points]"
    page.wait_for_selector(selector, state="attached", timeout=15_000)
    return int(page.get_attribute(selector, "data-points"))


def test_run_page_shows_charts_clients_and_the_prompt(
    browser: Any, finished_run: FinishedRun, test_output: Path
) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1500}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{finished_run.url}/#token={ADMIN}")

    row = page.locator(f"[data-testid=runs-table] tr[data-run-id='{finished_run.run_id}']")
    row.wait_for(timeout=15_000)
    assert "finished" in row.inner_text() and f"{ROUNDS} / {ROUNDS}" in row.inner_text()
    assert row.locator("td").all_inner_texts()[5] == str(SELECTED)  # the selected state column
    assert "#token" not in page.url  # the token is kept for the tab, not left in the address bar

    row.locator("a").click()
    page.wait_for_url(f"**/runs/{finished_run.run_id}")
    # The page fetches the run after it loads; everything below is drawn in the same task as the state.
    page.locator("[data-testid=run-state]", has_text="finished").wait_for(timeout=15_000)
    # One point per round for per-round series; accuracy has the states 0..R (R + 1 points).
    assert _points(page, "loss") == ROUNDS
    assert _points(page, "participants") == ROUNDS
    assert _points(page, "sigma") == ROUNDS
    assert _points(page, "bytes") == ROUNDS
    assert _points(page, "accuracy") == ROUNDS + 1
    # Validation loss of states 0..R beside the train loss; the selected state marked on the accuracy.
    validation = page.evaluate("window.fedbptCharts.loss.data.datasets[1].data.map(p => [p.x, p.y])")
    assert validation == [[i, v] for i, v in enumerate(VAL_LOSS)]
    marked = page.evaluate("window.fedbptCharts.accuracy.data.datasets[1].data.map(p => p.x)")
    assert marked == [SELECTED]
    assert f"selected state {SELECTED}" in page.locator("#run-summary").inner_text()
    chart_data = page.evaluate("window.fedbptCharts.participants.data.datasets[0].data.map(p => p.y)")
    assert chart_data == [2] * ROUNDS

    rows = page.locator("[data-testid=clients-table] tbody tr")
    assert rows.count() == 2
    table = [rows.nth(i).locator("td").all_inner_texts() for i in range(2)]
    assert [r[0] for r in table] == finished_run.names
    assert [r[2] for r in table] == [str(ROUNDS), str(ROUNDS)]
    assert [r[6] for r in table] == [
        f"{100 * finished_run.final_accuracy[n]:.2f}%" for n in finished_run.names
    ]

    with page.expect_download() as download:
        page.click("[data-testid=download-prompt]")
    prompt = PromptResponse.model_validate_json(Path(download.value.path()).read_bytes())
    assert prompt.z.numpy().shape == (16,) and (prompt.chosen, prompt.round) == ("selected", SELECTED)

    shots = test_output / "dashboard"
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "run.png"), full_page=True)
    assert errors == []
    page.close()


def test_without_the_token_the_page_asks_for_it(browser: Any, finished_run: FinishedRun) -> None:
    page = browser.new_page()
    page.goto(finished_run.url + "/")
    page.wait_for_selector("#login:not([hidden])", timeout=15_000)
    assert page.locator("[data-testid=runs-table] tbody tr").count() == 0  # nothing read without it
    page.fill("#token", "not-the-token")
    page.click("#login button")
    page.wait_for_function("document.getElementById('login-error').textContent.includes('refused')")
    page.fill("#token", ADMIN)
    page.click("#login button")
    page.locator(f"tr[data-run-id='{finished_run.run_id}']").wait_for(timeout=15_000)
    page.close()


@pytest.fixture(scope="module")
def service_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from inference_service.random_models import build_random_model

    model = build_random_model("st-bert", tmp_path_factory.mktemp("docs-model") / "st")
    port = free_port()
    argv = fedbpt_command("serve-model", "--model", str(model), "--port", str(port), "--device", "cpu")
    proc = ManagedProcess("serve-model", argv, tmp_path_factory.mktemp("docs-serve") / "serve.log")
    url = f"http://127.0.0.1:{port}"
    with running(proc, ready_url=f"{url}/readyz", timeout=180):
        yield url


def _api_page_offline(browser: Any, url: str, operations: int, test_output: Path, name: str) -> None:
    """/docs renders every operation with every request refused that leaves 127.0.0.1 (an
    air-gapped site). Break seen to fail: FastAPI's default /docs (Swagger UI from a CDN)."""
    page = browser.new_page(viewport={"width": 1200, "height": 1400})
    outside: list[str] = []
    errors: list[str] = []

    def route(r: Any) -> None:
        if r.request.url.startswith(url):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{url}/docs")
    page.wait_for_selector(".opblock", timeout=20_000)
    assert page.locator(".opblock").count() >= operations
    assert outside == [] and errors == [], (outside, errors)
    shots = test_output / "dashboard"
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"docs-{name}.png"))
    page.close()


def test_the_coordinator_api_page_needs_no_network(
    browser: Any, finished_run: FinishedRun, test_output: Path
) -> None:
    _api_page_offline(browser, finished_run.url, 14, test_output, "coordinator")


def test_the_service_api_page_needs_no_network(browser: Any, service_url: str, test_output: Path) -> None:
    _api_page_offline(browser, service_url, 6, test_output, "service")
