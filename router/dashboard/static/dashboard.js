// dicom-router dashboard: polls the JSON API every 2 s and redraws in place (no page reload).
// Values are put in the page as text (textContent), never as HTML.
"use strict";

const POLL_MS = 2000;
const HEADERS = { "X-Requested-With": "dicom-router-dashboard" };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function get(path) {
  const response = await fetch(path, { headers: HEADERS, credentials: "same-origin" });
  if (response.status === 401) { window.location = "/login"; throw new Error("sign in"); }
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", credentials: "same-origin",
    headers: { ...HEADERS, "Content-Type": "application/json" }, body: JSON.stringify(body || {}),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.detail ? JSON.stringify(answer.detail) : response.status);
  return answer;
}

function time(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleString() : "–";
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function chart(minutes) {
  const svg = document.getElementById("chart");
  const ns = "http://www.w3.org/2000/svg";
  const width = 600, height = 140, pad = 6;
  const max = Math.max(1, ...minutes.map(m => Math.max(m.received, m.forwarded, m.failed)));
  document.getElementById("chart-max").textContent = max;
  const step = minutes.length > 1 ? (width - 2 * pad) / (minutes.length - 1) : 0;
  const line = (key, color) => {
    const points = minutes.map((m, i) =>
      `${(pad + i * step).toFixed(1)},${(height - pad - (m[key] / max) * (height - 2 * pad)).toFixed(1)}`);
    const path = document.createElementNS(ns, "polyline");
    path.setAttribute("points", points.join(" "));
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", color);
    path.setAttribute("stroke-width", "2");
    path.setAttribute("vector-effect", "non-scaling-stroke");
    path.dataset.series = key;
    return path;
  };
  const received = line("received", "#2f6fdf");
  received.setAttribute("stroke-width", "5");  // under the forwarded line, visible where they coincide
  svg.replaceChildren(received, line("forwarded", "#1a9a5b"), line("failed", "#d03a2f"));
}

async function act(button, path, body, confirmText) {
  if (confirmText && !window.confirm(confirmText)) return;
  button.disabled = true;
  try {
    const answer = await post(path, body);
    status(answer.message || `done: ${JSON.stringify(answer)}`);
  } catch (error) {
    status(`failed: ${error.message}`, true);
  } finally {
    button.disabled = false;
    refresh();
  }
}

function button(label, path, body, confirmText) {
  const b = el("button", { type: "button" }, label);
  b.addEventListener("click", () => act(b, path, body, confirmText));
  return b;
}

function status(text, isError) {
  const node = document.getElementById("status");
  node.textContent = text;
  node.className = isError ? "error" : "muted";
}

function renderOverview(view) {
  document.getElementById("total-received").textContent = view.totals.received;
  document.getElementById("total-forwarded").textContent = view.totals.forwarded;
  document.getElementById("total-failed").textContent = view.totals.failed;
  document.getElementById("error-rate").textContent = `${(view.error_rate * 100).toFixed(1)} %`;
  const unavailable = document.getElementById("total-unavailable");
  unavailable.textContent = view.unavailable.join(", ") || "none";
  unavailable.classList.toggle("error", view.unavailable.length > 0);
  document.getElementById("total-quarantine").textContent = view.quarantine;
  document.getElementById("total-dead").textContent = view.dead_letters;
  const problem = document.getElementById("redis-problem");
  problem.hidden = !view.redis.problem;
  problem.textContent = view.redis.problem || "";
  chart(view.per_minute);
}

function renderDestinations(rows) {
  fill(document.querySelector("#destinations tbody"), rows.map(d => {
    const mpps = d.mpps_held === null || d.mpps_held === undefined ? "" : ` · MPPS held ${d.mpps_held}`;
    const waiting = (d.pending === null ? `${d.on_disk}` :
      `${d.on_disk} (pending ${d.pending}, delayed ${d.delayed}, in flight ${d.inflight})`) + mpps;
    const error = d.last_error ? `${time(d.last_error_at)}: ${d.last_error}` : "–";
    const statusText = d.last_dead_status ? ` · last dead letter: ${d.last_dead_status}` : "";
    const echo = d.last_echo ? `${time(d.last_echo)}: ${d.last_echo_ok ? "reached" : d.last_echo_error || "failed"}` : "–";
    const failedClasses = Object.entries(d.failed_sends || {});
    const failed = d.failed_sends === null ? "–" : failedClasses.reduce((sum, [, n]) => sum + n, 0) +
      (failedClasses.length ? ` (${failedClasses.map(([kind, n]) => `${kind} ${n}`).join(", ")})` : "");
    const commitment = d.commitment ?
      `${d.commitment.awaiting} awaiting, ${d.commitment.open_transactions} open` : "–";
    return el("tr", { "data-destination": d.name },
      el("td", {}, el("strong", {}, d.name), el("br"), el("span", { class: "muted" }, `${d.ae_title} @ ${d.address}`)),
      el("td", { class: `state-${d.state}`, "data-field": "state" }, d.state),
      el("td", { class: "num", "data-field": "waiting" }, waiting),
      el("td", { class: "num", "data-field": "oldest" }, age(d.oldest_age_seconds)),
      el("td", { class: "num", "data-field": "delivered" }, d.delivered ?? "–"),
      el("td", { class: "num", "data-field": "failed" }, failed),
      el("td", { "data-field": "last-ok" }, time(d.last_ok)),
      el("td", { "data-field": "last-error" }, error + statusText),
      el("td", { "data-field": "last-echo" }, echo),
      el("td", { "data-field": "held-until" }, time(d.held_until)),
      el("td", { "data-field": "commitment" }, commitment),
      el("td", { class: "num", "data-field": "dead" }, d.dead),
      el("td", {},
        button("C-ECHO", `/api/destinations/${encodeURIComponent(d.name)}/echo`, {}),
        button("retry all", "/api/dead-letters/retry", { destination: d.name }),
        d.dead ? button("purge all", "/api/dead-letters/purge", { destination: d.name },
          `Delete all ${d.dead} dead letters of ${d.name} for good?`) : null),
    );
  }));
}

function renderDeadLetters(letters) {
  document.getElementById("dead-empty").hidden = letters.length > 0;
  fill(document.querySelector("#dead-letters tbody"), letters.map(d => el("tr", { "data-spool-id": d.spool_id },
    el("td", {}, d.destination),
    el("td", { class: "uid" }, d.sop_instance_uid || "?"),
    el("td", { class: "uid" }, d.study_instance_uid || "?"),
    el("td", {}, time(d.since)),
    el("td", { class: "num" }, d.attempts),
    el("td", {}, d.status_text ? `${d.status_text}: ${d.reason}` : d.reason),
    el("td", {},
      button("retry", "/api/dead-letters/retry", { destination: d.destination, spool_ids: [d.spool_id] }),
      d.study_instance_uid ? button("retry study", "/api/dead-letters/retry",
        { destination: d.destination, study_instance_uid: d.study_instance_uid }) : null,
      button("purge", "/api/dead-letters/purge", { destination: d.destination, spool_ids: [d.spool_id] },
        "Delete this dead letter for good?"),
      d.study_instance_uid ? button("purge study", "/api/dead-letters/purge",
        { destination: d.destination, study_instance_uid: d.study_instance_uid },
        "Delete this study's dead letters for good?") : null),
  )));
}

function renderQuarantine(items) {
  document.getElementById("quarantine-empty").hidden = items.length > 0;
  document.getElementById("quarantine-all").replaceChildren(...(items.length ? [
    button("re-route all", "/api/quarantine/re-route", { all: true }),
    button("purge all", "/api/quarantine/purge", { all: true },
      `Delete all ${items.length} quarantined instances for good?`)] : []));
  fill(document.querySelector("#quarantine tbody"), items.map(q => el("tr", { "data-spool-id": q.spool_id },
    el("td", { class: "uid" }, q.spool_id), el("td", { class: "uid" }, q.sop_instance_uid || "?"),
    el("td", {}, time(q.since)), el("td", {}, q.reason),
    el("td", {},
      button("re-route", "/api/quarantine/re-route", { spool_ids: [q.spool_id] }),
      button("purge", "/api/quarantine/purge", { spool_ids: [q.spool_id] },
        "Delete this quarantined instance for good?")))));
}

function renderCommitmentReports(reports) {
  document.getElementById("commitment-reports-empty").hidden = reports.length > 0;
  fill(document.querySelector("#commitment-reports tbody"), reports.map(r => el("tr", {},
    el("td", { class: "uid" }, r.transaction_uid), el("td", {}, `${r.calling_ae} @ ${r.address}`),
    el("td", { class: "num" }, r.references), el("td", {}, time(r.created)), el("td", {}, r.state),
    el("td", { class: "num" }, r.attempts), el("td", {}, time(r.next_attempt)), el("td", {}, r.problem || "–"))));
}

function renderRules(view) {
  const reload = view.last_reload;
  document.getElementById("reload").textContent = reload ?
    `last reload ${time(reload.at)} (generation ${reload.generation}): ${reload.ok ? "applied" : "refused"}` +
    (reload.message ? ` — ${reload.message}` : "") : "no reload since start";
  fill(document.querySelector("#rules tbody"), view.rules.map(r => el("tr", {},
    el("td", {}, r.name + (r.final ? " (final)" : "")),
    el("td", {}, r.forward.join(", ") || "–"),
    el("td", { class: "num" }, r.hits))));
}

function renderJourneys(found) {
  const box = document.getElementById("journeys");
  if (!found.length) { box.replaceChildren(el("p", { class: "muted" }, "no instance recorded under that identifier")); return; }
  box.replaceChildren(...found.map(item => el("div", { class: "journey" },
    el("div", { class: "uid" },
      item.sop_instance_uid ? `${item.sop_instance_uid} (spool id ${item.spool_id})` : `spool id ${item.spool_id}`),
    el("ol", {}, ...item.journey.map(s => el("li", {},
      `${time(s.at)} ${s.step}`, s.destination ? ` → ${s.destination}` : "",
      statusWords(s.status),
      s.detail ? ` — ${s.detail}` : ""))))));
}

function statusWords(status) {
  return status === null || status === undefined ? "" :
    ` (status 0x${status.toString(16).padStart(4, "0").toUpperCase()})`;
}

async function showJourney(path, spoolId) {
  try {
    const answer = await get(path);
    renderJourneys(spoolId ? [{ spool_id: spoolId, journey: answer }] : answer);
  } catch (error) {
    status(`search failed: ${error.message}`, true);
  }
}

function renderRecent(steps) {
  fill(document.querySelector("#recent tbody"), steps.map(s => {
    const link = el("a", { href: "#journeys" }, s.spool_id);
    link.addEventListener("click", () => showJourney(`/api/instances/${encodeURIComponent(s.spool_id)}/journey`, s.spool_id));
    return el("tr", {}, el("td", {}, time(s.at)), el("td", { class: "uid" }, link),
      el("td", {}, s.step + statusWords(s.status)), el("td", {}, s.destination || "–"), el("td", {}, s.detail || ""));
  }));
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const [overview, destinations, letters, quarantine, rules, recent, reports] = await Promise.all([
      get("/api/overview"), get("/api/destinations"), get("/api/dead-letters?limit=200"),
      get("/api/quarantine?limit=200"), get("/api/rules"), get("/api/recent?limit=15"),
      get("/api/commitment-reports")]);
    renderRecent(recent);
    renderOverview(overview);
    renderDestinations(destinations);
    renderDeadLetters(letters);
    renderQuarantine(quarantine);
    renderCommitmentReports(reports);
    renderRules(rules);
    document.body.dataset.updated = String(Date.now());
    status(`updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    status(`cannot reach the router: ${error.message}`, true);
  } finally {
    busy = false;
  }
}

document.getElementById("search").addEventListener("submit", async event => {
  event.preventDefault();
  const q = document.getElementById("search-q").value.trim();
  await showJourney(`/api/instances?q=${encodeURIComponent(q)}`);
});

refresh();
setInterval(refresh, POLL_MS);
