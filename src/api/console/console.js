// crm-sync console: pipelines, runs and one run (run.js), live over the API's server-sent events
// (feed.js).
// Plain JavaScript, no build step and no external fetches; the token stays in this tab's
// sessionStorage and is sent as a bearer token on every call.
"use strict";

const TOKEN_KEY = "crm-sync-token";
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const session = { token: sessionStorage.getItem(TOKEN_KEY), scope: null };
let pageAbort = null; // aborts the current page's streams and timers when navigating away

// ---------------------------------------------------------------------------------------------
// DOM helpers: every text goes through textContent, never innerHTML.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const badge = (status) => h("span", { class: `badge ${status || ""}`, "data-status": status || "" }, status || "never");
// One wrapper per cell, so that a phone-width card row is "label | content".
const cell = (label, ...children) => h("td", { "data-label": label }, h("div", {}, ...children));
const link = (href, ...children) => h("a", { href, "data-link": true }, ...children);
const shortId = (id) => id.slice(0, 8);
// An id, name or URI (one long "word") may wrap after its separators: / _ . - (and, longer than a
// line between two of them, anywhere: CSS overflow-wrap).
const breakable = (text) => String(text).split(/(?<=[/_.-])/).flatMap((part, i) => (i ? [h("wbr"), part] : [part]));
// A figure (count, duration, attempts) never wraps inside itself.
const num = (text) => h("span", { class: "num" }, text);

function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}
function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
  if (m < 60) return `${m} min ${s} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}
function between(start, end) {
  if (!start) return null;
  const to = end ? new Date(end) : new Date();
  return (to - new Date(start)) / 1000;
}
function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  return `${fmtDuration(seconds)} ago`;
}

// ---------------------------------------------------------------------------------------------
// API calls.
class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${session.token}` }, options.headers || {});
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401) {
    signOut("Your token was not accepted. Sign in again.");
    throw new ApiError("unauthorized", 401);
  }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new ApiError(body.error || `${resp.status} ${resp.statusText}`, resp.status);
  return body;
}

function post(path) {
  return api(path, { method: "POST", headers: { "X-Crm-Sync-Client": "console" } });
}

// A stream refused for good: 401 signs out; anything else is shown by the page.
function streamRefused(status) {
  if (status === 401) signOut("Your token was not accepted. Sign in again.");
}

// Asks before an action that cannot be undone, in an in-page dialog naming what it acts on.
// Resolves true for `yes`; false for Back or Escape.
function confirmAction(question, detail, yes) {
  return new Promise((resolve) => {
    const dialog = h("dialog", { id: "confirm", class: "confirm" },
      h("p", { class: "question" }, question),
      h("p", { class: "muted" }, detail),
      h("form", { method: "dialog", class: "actions" },
        h("button", { value: "yes", id: "confirm-yes", class: "danger" }, yes),
        h("button", { value: "no", id: "confirm-no", class: "secondary", autofocus: true }, "Back")));
    dialog.addEventListener("close", () => { dialog.remove(); resolve(dialog.returnValue === "yes"); });
    document.body.append(dialog);
    dialog.showModal();
  });
}

// ---------------------------------------------------------------------------------------------
// Sign-in.
function signOut(message) {
  stopRunFeed();
  sessionStorage.removeItem(TOKEN_KEY);
  session.token = null;
  session.scope = null;
  navigate("/signin", message);
}

function renderSignIn(main, message) {
  document.getElementById("nav").hidden = true;
  const input = h("input", { type: "password", name: "token", id: "token", autocomplete: "current-password", required: true });
  const error = h("p", { class: "error", id: "signin-error" }, message || "");
  const form = h("form", {
    onsubmit: async (ev) => {
      ev.preventDefault();
      session.token = input.value.trim();
      try {
        const me = await api("/api/whoami");
        session.scope = me.scope;
        sessionStorage.setItem(TOKEN_KEY, session.token);
        navigate("/");
      } catch (e) {
        if (!(e instanceof ApiError) || e.status !== 401) error.textContent = e.message;
      }
    },
  },
  h("label", { for: "token" }, "API token", input),
  h("button", { type: "submit", id: "signin" }, "Sign in"),
  h("p", { class: "muted small" }, "A read token shows everything; an admin token can also start, retry, rerun and cancel runs, and disable or enable pipelines."));
  main.replaceChildren(h("div", { class: "card signin" }, h("h1", {}, "Sign in to crm-sync"), error, form));
}

// ---------------------------------------------------------------------------------------------
// Pipelines page.
async function renderPipelines(main, signal) {
  const live = h("span", { class: "live" }, "live");
  const body = h("tbody", { id: "pipelines" });
  const notice = h("div");
  main.replaceChildren(
    h("h1", {}, "Pipelines ", live),
    notice,
    h("table", {}, h("thead", {}, h("tr", {},
      ["Pipeline", "Schedule", "Next run", "Last run", "Freshness", ""].map((t) => h("th", {}, t)))), body));

  const load = async () => {
    const { pipelines } = await api("/api/pipelines");
    body.replaceChildren(...pipelines.map((p) => pipelineRow(p, notice, () => load().catch(() => {}))));
  };
  await load();
  let pending = null;
  followRuns(session.token, signal, live, () => {
    // Runs change in bursts: reload once per burst.
    if (!pending) pending = setTimeout(() => { pending = null; load().catch(() => {}); }, 300);
  }, () => load().catch(() => {}), streamRefused);
  const timer = setInterval(() => load().catch(() => {}), 30000); // ages and next fire times move on
  signal.addEventListener("abort", () => clearInterval(timer));
}

function pipelineRow(p, notice, reload) {
  const schedule = p.schedule
    ? [h("code", {}, p.schedule), h("div", { class: "muted small" }, p.timezone)]
    : [h("span", { class: "muted" }, "manual")];
  const next = p.next_fire_utc
    ? [h("div", {}, p.next_fire_local.replace("T", " ")), h("div", { class: "muted small" }, new Date(p.next_fire_utc).toISOString().replace("T", " ").replace(".000Z", " UTC"))]
    : [h("span", { class: "muted" }, p.enabled ? "" : "disabled")];
  const last = p.last_run_id
    ? [link(`/runs/${p.last_run_id}`, badge(p.last_status)), h("div", { class: "muted small" }, `${p.queued_runs} queued, ${p.running_runs} running`)]
    : [badge(null)];
  const freshness = [
    h("div", {}, `last success ${ago(p.seconds_since_success)}`),
    p.freshness_sla_s
      ? h("div", {}, p.stale ? badge("stale") : h("span", { class: "badge ok" }, "fresh"), h("span", { class: "muted small" }, ` SLA ${fmtDuration(p.freshness_sla_s)}`))
      : h("div", { class: "muted small" }, "no SLA"),
  ];
  const admin = session.scope === "admin";
  const act = (label, cls, path, after) => h("button", {
    class: cls, "data-pipeline": p.name,
    onclick: async (ev) => {
      ev.target.disabled = true;
      try {
        after(await post(`/api/pipelines/${encodeURIComponent(p.name)}/${path}`));
      } catch (e) {
        notice.replaceChildren(h("div", { class: "notice" }, e.message));
        ev.target.disabled = false;
      }
    },
  }, label);
  const actions = admin
    ? (p.enabled
        ? [act("Run now", "run-now", "runs", ({ id }) => navigate(`/runs/${id}`)),
           act("Disable", "disable secondary", "disable", reload)]
        : [act("Enable", "enable secondary", "enable", reload)])
    : [];
  // Who serves it, and whether the live processes agree on what it is.
  const state = [];
  if (!p.enabled) state.push(h("span", { class: "badge disabled", title: "no scheduled ticks, no new runs" }, `disabled by ${p.disabled_by || "config"}`));
  if (!p.served) state.push(h("span", { class: "badge unserved", title: "no live worker's config has this pipeline; its steps wait" },
    p.unserved_steps > 0 ? `no worker: ${p.unserved_steps} ${p.unserved_steps === 1 ? "step waits" : "steps wait"}` : "no live worker"));
  if (p.conflict) state.push(h("span", {
    class: "badge conflict",
    title: p.processes.map((d) => `${d.fingerprint} ${d.process_id}`).join("\n"),
  }, `${p.definitions} definitions`));
  return h("tr", { "data-pipeline": p.name },
    cell("Pipeline", h("strong", { class: "name" }, breakable(p.name)), h("div", { class: "muted small" }, p.steps.join(" → ")),
      h("div", { class: "states" }, ...state),
      h("div", { class: "muted small", title: "fingerprint of the registered definition" }, p.fingerprint ? `definition ${p.fingerprint}` : "")),
    cell("Schedule", ...schedule),
    cell("Next run", ...next),
    cell("Last run", ...last),
    cell("Freshness", ...freshness),
    cell("", ...actions));
}

// ---------------------------------------------------------------------------------------------
// Runs page.
const PAGE = 25;

async function renderRuns(main, signal, query) {
  const params = new URLSearchParams(query);
  const live = h("span", { class: "live" }, "live");
  const { pipelines } = await api("/api/pipelines");
  const pipelineSelect = h("select", { id: "filter-pipeline" },
    h("option", { value: "" }, "all"),
    pipelines.map((p) => h("option", { value: p.name, selected: params.get("pipeline") === p.name }, p.name)));
  const statusSelect = h("select", { id: "filter-status" },
    h("option", { value: "" }, "all"),
    ["queued", "running", "succeeded", "failed", "cancelled"].map((s) => h("option", { value: s, selected: params.get("status") === s }, s)));
  const apply = () => {
    const q = new URLSearchParams();
    if (pipelineSelect.value) q.set("pipeline", pipelineSelect.value);
    if (statusSelect.value) q.set("status", statusSelect.value);
    navigate(`/runs${q.toString() ? "?" + q : ""}`);
  };
  pipelineSelect.addEventListener("change", apply);
  statusSelect.addEventListener("change", apply);

  const body = h("tbody", { id: "runs" });
  const pager = h("div", { class: "pager" });
  main.replaceChildren(
    h("h1", {}, "Runs ", live),
    h("div", { class: "filters" }, h("label", {}, "Pipeline", pipelineSelect), h("label", {}, "Status", statusSelect)),
    h("table", {}, h("thead", {}, h("tr", {},
      ["Run", "Pipeline", "Status", "Batch", "Trigger", "Created", "Duration", "Rows loaded"].map((t) => h("th", {}, t)))), body),
    pager);

  const listQuery = new URLSearchParams(params);
  listQuery.set("limit", String(PAGE));
  const load = async () => {
    const { runs } = await api(`/api/runs?${listQuery}`);
    body.replaceChildren(...runs.map(runRow));
    if (!runs.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No runs.")));
    return runs;
  };
  const runs = await load();
  const firstPage = !params.get("before");
  if (!firstPage) pager.append(h("button", { class: "secondary", onclick: () => { params.delete("before"); navigate(`/runs?${params}`); } }, "← Newest"));
  if (runs.length === PAGE) {
    const older = new URLSearchParams(params);
    older.set("before", runs[runs.length - 1].created_at);
    pager.append(h("button", { class: "secondary", id: "older", onclick: () => navigate(`/runs?${older}`) }, "Older →"));
  }

  followRuns(session.token, signal, live, (kind, run) => {
    if (kind !== "run") return;
    const existing = body.querySelector(`tr[data-run="${run.id}"]`);
    const matches = (!params.get("pipeline") || params.get("pipeline") === run.pipeline)
      && (!params.get("status") || params.get("status") === run.status);
    if (existing) {
      if (matches) existing.replaceWith(runRow(run)); else existing.remove();
    } else if (matches && firstPage) {
      body.querySelector("td[colspan]")?.parentElement.remove();
      body.prepend(runRow(run));
    }
  }, () => load().catch(() => {}), streamRefused);
}

function runRow(r) {
  return h("tr", { "data-run": r.id },
    cell("Run", link(`/runs/${r.id}`, h("code", {}, shortId(r.id)))),
    cell("Pipeline", h("span", { class: "name" }, breakable(r.pipeline))),
    cell("Status", badge(r.status)),
    cell("Batch", h("code", {}, breakable(r.batch_id))),
    cell("Trigger", r.trigger),
    cell("Created", fmtTime(r.created_at)),
    cell("Duration", num(fmtDuration(between(r.started_at, r.finished_at)))),
    cell("Rows loaded", num(r.rows_loaded ?? "")));
}

// ---------------------------------------------------------------------------------------------
// Routing.
function navigate(path, message) {
  if (location.pathname + location.search !== path) history.pushState({}, "", path);
  route(message);
}

async function route(message) {
  if (pageAbort) pageAbort.abort();
  pageAbort = new AbortController();
  const signal = pageAbort.signal;
  const main = document.getElementById("main");
  const path = location.pathname;
  if (!session.token || path === "/signin") {
    renderSignIn(main, message);
    return;
  }
  try {
    if (!session.scope) session.scope = (await api("/api/whoami")).scope;
  } catch (e) {
    return;
  }
  const nav = document.getElementById("nav");
  nav.hidden = false;
  document.getElementById("scope").textContent = session.scope === "admin" ? "admin" : "read only";
  for (const a of nav.querySelectorAll("a")) {
    a.classList.toggle("active", (a.dataset.nav === "runs") === path.startsWith("/runs"));
  }
  try {
    const runMatch = path.match(/^\/runs\/([0-9a-f-]{36})$/);
    if (runMatch) await renderRun(main, signal, runMatch[1]);
    else if (path === "/runs") await renderRuns(main, signal, location.search);
    else await renderPipelines(main, signal);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) {
      main.replaceChildren(h("div", { class: "notice" }, e.message));
    }
  }
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a[data-link]");
  if (!a || ev.metaKey || ev.ctrlKey || ev.shiftKey || a.target === "_blank") return;
  ev.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", () => route());
// Into the back/forward cache: close every stream (they hold connections other pages need); back
// out of it: open them again.
window.addEventListener("pagehide", () => { pageAbort?.abort(); stopRunFeed(); });
window.addEventListener("pageshow", (ev) => { if (ev.persisted) route(); });
document.getElementById("signout").addEventListener("click", () => signOut(""));
route();
