// The run dashboard. It reads the coordinator's public REST routes with the admin token, like any
// other client would: GET /v1/runs, /v1/runs/{id}, /v1/runs/{id}/rounds, /v1/runs/{id}/clients and
// /v1/runs/{id}/prompt. While a run is going it polls every few seconds.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "fedbpt-admin-token";
const charts = {};
window.fedbptCharts = charts; // read by the browser test (points per chart)

function takeTokenFromHash() {
  // `fedbpt simulate` prints the dashboard URL with #token=...; keep it for this tab, then hide it.
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

class Unauthorized extends Error {}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(path, { headers });
  if (response.status === 401 || response.status === 403) throw new Unauthorized(await response.text());
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status} ${await response.text()}`);
  return response.json();
}

const fmt = {
  pct: (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(2)}%`),
  num: (x, digits = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits)),
  time: (t) => (t ? new Date(t * 1000).toLocaleString() : "–"),
};

function cell(row, text, numeric = false) {
  const td = document.createElement("td");
  td.textContent = text;
  if (numeric) td.className = "num";
  row.appendChild(td);
  return td;
}

function show(id) {
  for (const section of ["login", "runs", "run"]) document.getElementById(section).hidden = section !== id;
}

function setStatus(text) {
  document.getElementById("status").textContent = text;
}

// ----- the list of runs -----
async function renderRuns() {
  const runs = await api("/v1/runs");
  show("runs");
  const body = document.querySelector("#runs tbody");
  body.replaceChildren();
  for (const run of runs) {
    const row = document.createElement("tr");
    row.dataset.runId = run.run_id;
    const link = document.createElement("a");
    link.href = `/runs/${encodeURIComponent(run.run_id)}`;
    link.textContent = run.run_id;
    cell(row, "").appendChild(link);
    cell(row, run.config.name || "");
    cell(row, run.state);
    cell(row, `${run.rounds_completed} / ${run.config.rounds}`, true);
    cell(row, String(run.clients), true);
    cell(row, run.selected_state === null ? "–" : String(run.selected_state), true);
    cell(row, fmt.pct(run.final_accuracy), true);
    cell(row, fmt.pct(run.best_accuracy), true);
    cell(row, fmt.time(run.created_at));
    body.appendChild(row);
  }
  document.querySelector("#runs .empty").hidden = runs.length > 0;
  return runs.some((r) => r.state === "running" || r.state === "created");
}

// ----- one run -----
function lineChart(id, title, yLabel, datasets, type = "line", xLabel = "round") {
  const options = {
    animation: false,
    maintainAspectRatio: false,
    plugins: { title: { display: true, text: title } },
    scales: {
      x: { type: "linear", title: { display: true, text: xLabel }, ticks: { precision: 0 } },
      y: { title: { display: true, text: yLabel } },
    },
  };
  if (!charts[id]) {
    charts[id] = new Chart(document.getElementById(`chart-${id}`), { type, data: { datasets }, options });
  } else {
    charts[id].data.datasets = datasets;
    charts[id].update();
  }
  const points = datasets.length ? datasets[0].data.length : 0;
  document.getElementById(`chart-${id}`).dataset.points = String(points);
}

function series(rounds, value) {
  return rounds.filter((r) => value(r) !== null && value(r) !== undefined).map((r) => ({ x: r.round, y: value(r) }));
}

function accuracyPoints(rounds) {
  // Round r's record holds the accuracy of global state r; the last round's final_test_accuracy
  // is the accuracy of the final state (r + 1).
  const points = series(rounds, (r) => r.test_accuracy);
  const last = rounds.filter((r) => r.state === "closed").at(-1);
  if (last && last.final_test_accuracy !== null) points.push({ x: last.round + 1, y: last.final_test_accuracy });
  return points;
}

function validationPoints(rounds) {
  // Round r's val_loss is state r's; the last round's final_val_loss is the final state's.
  const points = series(rounds, (r) => r.val_loss);
  const last = rounds.filter((r) => r.state === "closed").at(-1);
  if (last && last.final_val_loss !== null && last.final_val_loss !== undefined) points.push({ x: last.round + 1, y: last.final_val_loss });
  return points;
}

function renderCharts(rounds, selected) {
  const closed = rounds.filter((r) => r.state === "closed");
  const linear = (label, data, color) => ({ label, data, borderColor: color, backgroundColor: color, pointRadius: 3, showLine: true });
  const accuracy = accuracyPoints(rounds);
  const picked = accuracy.filter((p) => p.x === selected);
  lineChart("accuracy", "test accuracy of the global prompt", "accuracy", [
    linear("accuracy", accuracy, "#1f77b4"),
    { label: "selected (lowest validation loss)", data: picked, borderColor: "#9467bd", backgroundColor: "#9467bd", pointRadius: 10, borderWidth: 3, pointStyle: "crossRot", showLine: false, order: -1 },
  ], "line", "global state (rounds aggregated)");
  lineChart("loss", "mean client loss: train, and validation of state r", "cross-entropy", [
    linear("train loss", series(closed, (r) => r.train_loss), "#d62728"),
    linear("validation loss", validationPoints(rounds), "#9467bd"),
  ], "line", "round / state");
  lineChart("sigma", "step sizes", "sigma", [
    linear("client sigma", series(closed, (r) => r.sigma_before), "#2ca02c"),
    linear("server sigma'", series(closed, (r) => r.server_sigma), "#bcbd22"),
  ]);
  lineChart("participants", "participants per round", "clients", [
    { label: "participants", data: closed.map((r) => ({ x: r.round, y: r.participants.length })), backgroundColor: "#9467bd" },
  ], "bar");
  lineChart("bytes", "bytes per round (measured on the wire)", "bytes", [
    linear("clients → coordinator", series(closed, (r) => r.bytes_in), "#8c564b"),
    linear("coordinator → clients", series(closed, (r) => r.bytes_out), "#17becf"),
  ]);
}

function renderClients(clients) {
  const body = document.querySelector("#run tbody");
  body.replaceChildren();
  for (const c of clients) {
    const row = document.createElement("tr");
    row.dataset.clientId = c.client_id;
    cell(row, c.name);
    cell(row, c.client_id);
    cell(row, String(c.rounds_contributed), true);
    cell(row, c.last_round === null ? "–" : String(c.last_round), true);
    cell(row, fmt.time(c.last_seen));
    cell(row, fmt.num(c.train_loss), true);
    cell(row, fmt.pct(c.test_accuracy), true);
    body.appendChild(row);
  }
}

async function downloadPrompt(runId) {
  const prompt = await api(`/v1/runs/${encodeURIComponent(runId)}/prompt`);
  const blob = new Blob([JSON.stringify(prompt, null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${runId}-prompt.json`;
  link.click();
  URL.revokeObjectURL(link.href);
}

async function renderRun(runId) {
  const path = `/v1/runs/${encodeURIComponent(runId)}`;
  const [info, rounds, clients] = await Promise.all([api(path), api(`${path}/rounds`), api(`${path}/clients`)]);
  show("run");
  document.getElementById("run-title").textContent = `${info.config.name || "run"} · ${info.run_id}`;
  const state = document.getElementById("run-state");
  state.textContent = info.state;
  state.className = `state ${info.state}`;
  const p = info.config.projection;
  document.getElementById("run-summary").textContent =
    `${info.rounds_completed} of ${info.config.rounds} rounds · ${info.clients} clients · task ${info.config.task} · ` +
    `aggregator ${info.config.aggregator} · d=${p.intrinsic_dim}, L=${p.prompt_length} · ` +
    `selected state ${info.selected_state ?? "–"} (validation loss ${fmt.num(info.selected_val_loss)}) · ` +
    `final ${fmt.pct(info.final_accuracy)} · best by test (hindsight) ${fmt.pct(info.best_accuracy)}`;
  document.getElementById("run-error").textContent = info.error || "";
  const button = document.getElementById("download");
  button.disabled = info.state === "created";
  button.onclick = () => downloadPrompt(runId).catch((e) => setStatus(String(e)));
  renderCharts(rounds, info.selected_state);
  renderClients(clients);
  return info.state === "running" || info.state === "created";
}

// ----- routing and polling -----
async function refresh() {
  const match = location.pathname.match(/^\/runs\/([^/]+)$/);
  try {
    const live = match ? await renderRun(decodeURIComponent(match[1])) : await renderRuns();
    setStatus(`updated ${new Date().toLocaleTimeString()}${live ? " · live" : ""}`);
    if (live) setTimeout(refresh, POLL_MS);
  } catch (error) {
    if (error instanceof Unauthorized) {
      show("login");
      document.getElementById("login-error").textContent = sessionStorage.getItem(TOKEN_KEY) ? "That token was refused." : "";
    } else {
      setStatus(String(error));
      setTimeout(refresh, POLL_MS * 2);
    }
  }
}

document.getElementById("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
  refresh();
});

takeTokenFromHash();
refresh();
