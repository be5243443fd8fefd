// The Lingua Scheduler dashboard: plain JavaScript, no build step. It reads the JSON API under /api/
// (server/dashboard.py) and follows /api/events, a server-sent-events stream of snapshots (stats, nodes,
// failed jobs) about once a second. Text from the server is only ever set as text (never as HTML).
"use strict";

const TOKEN_KEY = "lingua.dashboard.token"; // sessionStorage: this tab only
const STATES = ["QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED", "FAILED", "EXPIRED", "CANCELLED"];
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "EXPIRED", "CANCELLED"]);

const $ = (id) => document.getElementById(id);

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (value !== undefined && value !== null && value !== false) el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

const stateName = (s) => (s || "").replace(/^JOB_STATE_/, "");

function clock(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function dateTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + clock(iso);
}

function age(seconds) {
  if (!(seconds > 0)) return "–";
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + Math.floor(seconds % 60) + " s";
  return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
}

function rate(value) {
  const v = Number(value || 0);
  return v === 0 ? "0" : v < 10 ? v.toFixed(2) : v.toFixed(1);
}

function notice(text, kind = "info") {
  const el = $("notice");
  el.className = kind;
  setText(el, text);
  el.hidden = false;
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { el.hidden = true; }, 6000);
}

function showError(id, err) {
  const el = $(id);
  el.hidden = !err;
  setText(el, err ? (err.message || String(err)) : "");
}

// -- the API -------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error && body.error.code;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  if (method === "POST") {
    headers["X-Lingua-Dashboard"] = "1"; // the server's CSRF check: pages of other sites cannot send it
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: method === "POST" ? JSON.stringify(body || {}) : undefined,
  });
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const err = new ApiError(response.status, data);
    if (response.status === 401) signedOut(err.message);
    throw err;
  }
  return data;
}

// -- signing in ------------------------------------------------------------------------------------------

async function start() {
  $("sign-in-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await signIn($("token").value.trim());
      $("token").value = "";
    } catch (err) {
      showError("sign-in-error", err);
    }
  });
  $("sign-out").addEventListener("click", async () => {
    try { await api("POST", "/api/session/end"); } catch (_) { /* signed out anyway */ }
    sessionStorage.removeItem(TOKEN_KEY);
    signedOut("Signed out.");
  });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    search.query = {
      job_id: $("search-job").value.trim(),
      tenant_id: $("search-tenant").value.trim(),
      session_id: $("search-session").value.trim(),
    };
    runSearch();
  });
  let session;
  try {
    session = await api("GET", "/api/session");
  } catch (err) {
    notice("The dashboard API cannot be reached: " + err.message, "error");
    return;
  }
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!session.auth) showBoard();
  else if (token) signIn(token).catch((err) => signedOut(err.message));
  else signedOut();
}

async function signIn(token) {
  if (!token) throw new Error("Paste a token first.");
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("POST", "/api/session"); // sets the HttpOnly cookie EventSource sends
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    throw err;
  }
  $("sign-out").hidden = false;
  showBoard();
}

function signedOut(why) {
  live.stop();
  live.state("offline", "signed out");
  sessionStorage.removeItem(TOKEN_KEY);
  $("board").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  showError("sign-in-error", why ? new Error(why) : null);
  $("token").focus();
}

function showBoard() {
  $("sign-in").hidden = true;
  $("board").hidden = false;
  live.start();
}

// -- live updates ------------------------------------------------------------------------------------------

const live = {
  source: null,
  last: null,
  start() {
    if (this.source) return;
    this.state("connecting");
    const source = new EventSource("/api/events");
    this.source = source;
    source.addEventListener("open", () => this.state("live"));
    source.addEventListener("snapshot", (e) => {
      this.state("live");
      render(JSON.parse(e.data));
    });
    source.addEventListener("expired", () => {
      this.stop();
      signedOut("The token has expired: sign in with a fresh one.");
    });
    source.addEventListener("error", async () => {
      if (source.readyState !== EventSource.CLOSED) { this.state("connecting"); return; } // it retries
      this.stop();
      this.state("offline");
      try { // refused (401/403) or the server is gone: find out which
        const s = await api("GET", "/api/session");
        if (s.auth && !s.signed_in) { signedOut("Sign in again."); return; }
      } catch (_) { /* unreachable: retry below */ }
      setTimeout(() => { if (!$("board").hidden) this.start(); }, 2000);
    });
  },
  stop() {
    if (this.source) this.source.close();
    this.source = null;
  },
  state(name, label) {
    const el = $("live");
    el.className = "live " + name;
    setText(el, label || name);
  },
};

function render(snapshot) {
  live.last = snapshot;
  const asOf = snapshot.stats && snapshot.stats.as_of;
  setText($("as-of"), "as of " + clock(asOf || snapshot.at));
  renderPools(snapshot.stats);
  renderNodes(snapshot.nodes, asOf || snapshot.at);
  renderFailed(snapshot.failed);
  if (search.query && search.live && !search.busy) runSearch(true);
}

// Rows keyed by `key`: kept and updated in place (buttons, focus and selections survive the updates).
function syncRows(table, items, key, make, update) {
  const body = table.tBodies[0];
  const existing = new Map([...body.rows].map((row) => [row.dataset.key, row]));
  let previous = null;
  for (const item of items) {
    const k = key(item);
    let row = existing.get(k);
    existing.delete(k);
    if (!row) {
      row = make(item);
      row.dataset.key = k;
    }
    update(row, item);
    const next = previous ? previous.nextSibling : body.firstChild;
    if (row !== next) body.insertBefore(row, next);
    previous = row;
  }
  for (const row of existing.values()) row.remove();
}

function cells(row, names) {
  for (const name of names) row.append(h("td", { dataset: { field: name } }));
}

function field(row, name) {
  return row.querySelector(`[data-field="${name}"]`);
}

// A bar and "used / capacity" in `cell`, redrawn only when the figures change.
function setLoad(cell, used, capacity) {
  const figure = `${used} / ${capacity}`;
  if (cell.dataset.figure === figure) return;
  const share = capacity > 0 ? Math.min(1, used / capacity) : 0;
  const fill = h("span", { class: share >= 1 ? "full" : "" });
  fill.style.width = `${Math.round(share * 100)}%`; // through the CSSOM: the page's CSP allows no inline style
  cell.replaceChildren(h("span", { class: "load" }, h("span", { class: "bar" }, fill), h("span", { class: "figure" }, figure)));
  cell.dataset.figure = figure;
}

// -- pools -----------------------------------------------------------------------------------------------

function renderPools(stats) {
  showError("pools-error", stats && stats.error);
  const pools = (stats && stats.pools) || [];
  $("pools-empty").hidden = pools.length > 0 || !!(stats && stats.error);
  syncRows($("pools"), pools, (p) => p.pool, (p) => {
    const row = h("tr", { dataset: { pool: p.pool } });
    cells(row, ["pool", "dispatch", ...STATES.map((s) => s.toLowerCase()), "oldest", "submitted", "finished", "nodes", "load", "action"]);
    for (const s of STATES) field(row, s.toLowerCase()).className = "num";
    for (const f of ["oldest", "submitted", "finished", "nodes"]) field(row, f).className = "num";
    field(row, "action").append(h("button", { type: "button", class: "pause", onclick: () => togglePause(row) }));
    return row;
  }, (row, p) => {
    const counts = Object.fromEntries((p.jobs || []).map((c) => [stateName(c.state), Number(c.count)]));
    setText(field(row, "pool"), p.pool);
    const dispatch = field(row, "dispatch");
    setText(dispatch, p.paused ? "paused" : "dispatching");
    dispatch.className = p.paused ? "badge paused" : "badge ok";
    dispatch.title = p.paused ? `paused${p.paused_reason ? `: ${p.paused_reason}` : ""}` : "";
    for (const s of STATES) setText(field(row, s.toLowerCase()), String(counts[s] || 0));
    setText(field(row, "oldest"), age(parseFloat(p.oldest_queued_age || "0")));
    setText(field(row, "submitted"), rate(p.submitted_per_second));
    setText(field(row, "finished"), rate(p.finished_per_second));
    setText(field(row, "nodes"), String(p.nodes || 0));
    // Held jobs by their state (counted with every change) rather than the nodes' in_flight, which is as
    // of their last registry renewal.
    const held = (counts.ASSIGNED || 0) + (counts.RUNNING || 0);
    setLoad(field(row, "load"), held, p.capacity || 0);
    row.dataset.paused = p.paused ? "true" : "false";
    const button = field(row, "action").firstChild;
    if (!button.disabled) setText(button, p.paused ? "Resume" : "Pause");
  });
}

async function togglePause(row) {
  const pool = row.dataset.pool;
  const pause = row.dataset.paused !== "true";
  const button = field(row, "action").firstChild;
  button.disabled = true;
  try {
    const state = await api("POST", `/api/pools/${encodeURIComponent(pool)}/${pause ? "pause" : "resume"}`,
      pause ? { reason: "paused from the dashboard" } : {});
    row.dataset.paused = state.paused ? "true" : "false";
    const dispatch = field(row, "dispatch");
    setText(dispatch, state.paused ? "paused" : "dispatching");
    dispatch.className = state.paused ? "badge paused" : "badge ok";
    setText(button, state.paused ? "Resume" : "Pause");
    notice(`Pool ${pool} ${state.paused ? "paused: nothing is dispatched until it is resumed" : "resumed"}.`);
  } catch (err) {
    notice(`Pool ${pool}: ${err.message}`, "error");
  } finally {
    button.disabled = false;
  }
}

// -- nodes -----------------------------------------------------------------------------------------------

function renderNodes(nodes, now) {
  const failed = nodes && nodes.error;
  showError("nodes-error", failed);
  const list = Array.isArray(nodes) ? nodes : [];
  $("nodes-empty").hidden = list.length > 0 || !!failed;
  const nowMs = Date.parse(now) || Date.now();
  syncRows($("nodes"), list, (n) => n.node_id, (n) => {
    const row = h("tr", { dataset: { node: n.node_id } });
    cells(row, ["node", "pools", "load", "labels", "state", "seen", "connected", "version", "instance"]);
    return row;
  }, (row, n) => {
    setText(field(row, "node"), n.node_id);
    setText(field(row, "pools"), (n.pools || []).join(", "));
    setLoad(field(row, "load"), n.in_flight || 0, n.max_concurrency || 0);
    const labels = Object.entries(n.labels || {}).sort().map(([k, v]) => `${k}=${v}`);
    if (field(row, "labels").dataset.text !== labels.join(",")) {
      field(row, "labels").replaceChildren(...labels.map((l) => h("span", { class: "chip" }, l)));
      field(row, "labels").dataset.text = labels.join(",");
    }
    const state = n.draining ? "draining" : n.quarantined ? "quarantined" : "serving";
    setText(field(row, "state"), state);
    field(row, "state").className = "badge " + (state === "serving" ? "ok" : "warn");
    const seen = (nowMs - Date.parse(n.last_seen)) / 1000;
    setText(field(row, "seen"), seen < 1 ? "just now" : age(seen) + " ago");
    setText(field(row, "connected"), dateTime(n.connected_at));
    setText(field(row, "version"), n.version || "");
    setText(field(row, "instance"), n.instance_id || "");
  });
}

// -- failed jobs -----------------------------------------------------------------------------------------

function renderFailed(failed) {
  showError("failed-error", failed && failed.error);
  const jobs = (failed && failed.jobs) || [];
  $("failed-empty").hidden = jobs.length > 0 || !!(failed && failed.error);
  syncRows($("failed"), jobs, (j) => j.job_id, (j) => {
    const row = h("tr", { dataset: { job: j.job_id } });
    cells(row, ["at", "job", "pool", "session", "attempts", "error", "action"]);
    field(row, "attempts").className = "num";
    field(row, "job").append(h("a", { href: "#", class: "mono", onclick: (e) => { e.preventDefault(); findJob(j.job_id); } }));
    field(row, "action").append(h("button", { type: "button", class: "retry", onclick: () => retry(row, j.job_id) }, "Retry"));
    return row;
  }, (row, j) => {
    const spec = j.spec || {};
    setText(field(row, "at"), dateTime(j.updated_at));
    setText(field(row, "job").firstChild, j.job_id);
    setText(field(row, "pool"), `${spec.src_lang}:${spec.tgt_lang}`);
    setText(field(row, "session"), `${spec.tenant_id} / ${spec.session_id} #${spec.utterance_index}`);
    setText(field(row, "attempts"), `${j.attempt} / ${j.max_attempts}`);
    const e = j.last_error || {};
    setText(field(row, "error"), e.code ? `${e.code}: ${e.message}` : "");
  });
}

async function retry(row, jobId) {
  const button = field(row, "action").firstChild;
  button.disabled = true;
  try {
    const job = await api("POST", `/api/jobs/${encodeURIComponent(jobId)}/retry`, { reason: "retried from the dashboard" });
    notice(`Job ${jobId} is ${stateName(job.state).toLowerCase()} again.`);
    row.remove();
    findJob(jobId);
  } catch (err) {
    notice(`Retry ${jobId}: ${err.message}`, "error");
    button.disabled = false;
  }
}

// -- job search -------------------------------------------------------------------------------------------

const search = { query: null, busy: false, live: false };

function findJob(jobId) {
  $("search-job").value = jobId;
  $("search-tenant").value = "";
  $("search-session").value = "";
  search.query = { job_id: jobId };
  runSearch();
  $("search-form").scrollIntoView({ behavior: "smooth", block: "start" });
}

async function runSearch(quiet) {
  const q = search.query;
  let path;
  if (q.job_id) path = `/api/jobs/${encodeURIComponent(q.job_id)}`;
  else if (q.tenant_id && q.session_id) {
    path = `/api/jobs?timeline=1&page_size=100&tenant_id=${encodeURIComponent(q.tenant_id)}&session_id=${encodeURIComponent(q.session_id)}`;
  } else {
    showError("search-error", new Error("Give a job id, or a tenant and a session."));
    return;
  }
  search.busy = true;
  try {
    const found = await api("GET", path);
    if (q !== search.query) return; // a newer search was started meanwhile
    showError("search-error", null);
    renderJobs(found.jobs || []);
    // Refreshed with the live updates while any job shown can still change.
    search.live = (found.jobs || []).some((j) => !TERMINAL.has(stateName(j.state)));
  } catch (err) {
    if (!quiet || err.status !== 401) showError("search-error", err);
    if (!quiet) $("search-results").replaceChildren();
    search.live = false;
  } finally {
    search.busy = false;
  }
}

function renderJobs(jobs) {
  const results = $("search-results");
  if (!jobs.length) {
    results.replaceChildren(h("p", { class: "muted" }, "No job found."));
    return;
  }
  results.replaceChildren(...jobs.map(jobCard));
}

function jobCard(j) {
  const spec = j.spec || {};
  const state = stateName(j.state);
  const e = j.last_error || {};
  return h("article", { class: "job", dataset: { job: j.job_id, state } },
    h("div", { class: "job-head" },
      h("span", { class: "mono" }, j.job_id),
      h("span", { class: `badge state-${state.toLowerCase()}`, dataset: { field: "state" } }, state)),
    h("dl", {},
      h("dt", {}, "Pool"), h("dd", {}, `${spec.src_lang}:${spec.tgt_lang}`),
      h("dt", {}, "Tenant / session"), h("dd", {}, `${spec.tenant_id} / ${spec.session_id} #${spec.utterance_index}`),
      h("dt", {}, "Attempt"), h("dd", {}, `${j.attempt} / ${j.max_attempts}`),
      h("dt", {}, "Node"), h("dd", {}, j.node_id || "–"),
      h("dt", {}, "Created"), h("dd", {}, dateTime(j.created_at)),
      e.code ? [h("dt", {}, "Last error"), h("dd", { class: "error-text" }, `${e.code}: ${e.message}`)] : null),
    h("table", { class: "timeline" },
      h("thead", {}, h("tr", {}, ["Time", "Event", "State", "Attempt", "Node", "Error"].map(
        (t) => h("th", { class: t === "Attempt" ? "num" : null }, t)))),
      h("tbody", {}, (j.timeline || []).map((ev) => {
        const err = ev.error || {};
        return h("tr", { dataset: { event: ev.event } },
          h("td", { class: "mono" }, clock(ev.at)),
          h("td", {}, ev.event),
          h("td", {}, h("span", { class: `badge state-${stateName(ev.state).toLowerCase()}` }, stateName(ev.state))),
          h("td", { class: "num" }, String(ev.attempt)),
          h("td", {}, ev.node_id || ""),
          h("td", { class: "error-text" }, err.code ? `${err.code}: ${err.message}` : ""));
      }))));
}

document.addEventListener("DOMContentLoaded", start);
