// crm-sync console: one run's page (/runs/{id}): its facts, its steps live over the run's event
// stream, and an admin's Retry, Rerun and Cancel. Uses the helpers of console.js and feed.js.
"use strict";

async function renderRun(main, signal, id) {
  const live = h("span", { class: "live" }, "live");
  const header = h("div", { class: "card", id: "run-header" });
  const actions = h("div", { class: "actions", id: "run-actions" });
  const notice = h("div");
  const steps = h("tbody", { id: "steps" });
  main.replaceChildren(
    h("h1", {}, "Run ", h("code", {}, shortId(id)), " ", live),
    notice, header, actions,
    h("h2", {}, "Steps"),
    h("table", {}, h("thead", {}, h("tr", {},
      ["Step", "State", "Attempts", "Duration", "Rows", "Output", "Error"].map((t) => h("th", {}, t)))), steps));

  let run = null;
  const drawStep = (s) => {
    const row = stepRow(s);
    const existing = steps.querySelector(`tr[data-step="${s.name}"]`);
    if (existing) existing.replaceWith(row); else steps.append(row);
  };
  const draw = (detail) => {
    run = detail;
    steps.replaceChildren();
    detail.steps.forEach(drawStep);
    drawRun();
  };
  // The whole run again: what a finished run's stream does not carry (who retried it, why it failed).
  const refresh = () => api(`/api/runs/${id}`).then(draw).catch(() => drawRun());
  const drawRun = () => {
    header.replaceChildren(runFacts(run));
    actions.replaceChildren();
    if (session.scope === "admin") actions.append(...runActions(run, notice, refresh));
  };

  follow(`/api/runs/${id}/events`, {
    token: session.token,
    signal,
    whileVisible: true,
    finished: () => run !== null && FINAL.has(run.status),
    onState: (state) => showLive(live, state),
    onFatal: (status) => {
      if (status === 404) runNotFound(main, id);
      else streamRefused(status);
    },
    onEvent: (kind, data) => {
      if (kind === "snapshot") {
        draw(data);
      } else if (kind === "step") {
        drawStep(data);
      } else if (kind === "run" && run) {
        Object.assign(run, data);
        // Finished: drawn once, with what only the whole run says (who retried it, why it failed).
        if (FINAL.has(data.status)) refresh(); else drawRun();
      }
    },
  });
}

// An unknown (or deleted) run id: say so once, and stop.
function runNotFound(main, id) {
  main.replaceChildren(h("div", { class: "card", id: "run-not-found" },
    h("h1", {}, "Run not found"),
    h("p", {}, "No run has the id ", h("code", { class: "id" }, id), ": it may have been removed by retention, or the link is wrong."),
    link("/runs", "All runs")));
}

function runFacts(run) {
  const runLink = (other) => link(`/runs/${other}`, h("code", {}, shortId(other)));
  return h("dl", { class: "facts" },
    h("dt", {}, "Pipeline"), h("dd", {}, link(`/runs?pipeline=${encodeURIComponent(run.pipeline)}`, h("span", { class: "name" }, breakable(run.pipeline)))),
    h("dt", {}, "Status"), h("dd", { id: "run-status" }, badge(run.status)),
    h("dt", {}, "Batch"), h("dd", {}, h("code", { class: "id" }, breakable(run.batch_id))),
    h("dt", {}, "Trigger"), h("dd", {}, run.trigger),
    run.retry_of ? [h("dt", {}, "Retry of"), h("dd", {}, runLink(run.retry_of))] : [],
    run.rerun_of ? [h("dt", {}, "Rerun of"), h("dd", {}, runLink(run.rerun_of))] : [],
    run.retried_by ? [h("dt", {}, "Retried as"), h("dd", { id: "retried-by" }, runLink(run.retried_by))] : [],
    h("dt", {}, "Created"), h("dd", {}, fmtTime(run.created_at)),
    h("dt", {}, "Started"), h("dd", {}, fmtTime(run.started_at)),
    h("dt", {}, "Finished"), h("dd", {}, fmtTime(run.finished_at)),
    h("dt", {}, "Duration"), h("dd", {}, num(fmtDuration(between(run.started_at, run.finished_at)))),
    Object.keys(run.params || {}).length ? [h("dt", {}, "Params"), h("dd", {}, h("code", { class: "id" }, JSON.stringify(run.params)))] : [],
    run.error ? [h("dt", {}, "Error"), h("dd", { class: "error", id: "run-error" }, run.error)] : [],
    definitionsFact(run));
}

// An admin's buttons for a run: Retry only where it can help, Cancel and Rerun after a confirmation
// naming the pipeline and the batch.
function runActions(run, notice, refresh) {
  const batch = `pipeline ${run.pipeline}, batch ${run.batch_id}`;
  const act = (label, cls, path, confirmation) => h("button", {
    class: cls, id: `action-${label.toLowerCase()}`,
    onclick: async (ev) => {
      const button = ev.currentTarget;
      if (confirmation && !(await confirmAction(...confirmation))) return;
      button.disabled = true;
      try {
        const res = await post(`/api/runs/${run.id}/${path}`);
        if (res.id && res.id !== run.id) navigate(`/runs/${res.id}`);
      } catch (e) {
        button.disabled = false;
        // Changed elsewhere (retried, finished): show what the run is now; the message only if
        // that still offers the same button.
        if (e.status === 409) await refresh();
        if (e.status !== 409 || document.getElementById(button.id)) {
          notice.replaceChildren(h("div", { class: "notice" }, e.message));
        }
      }
    },
  }, label);
  const buttons = [];
  const failed = run.status === "failed" || run.status === "cancelled";
  if (failed && run.failure?.retry_repeats_failure && !run.retried_by) {
    buttons.push(h("p", { class: "advice muted", id: "retry-advice" },
      `No Retry: it would check the same staged batch in ${run.failure.step} again and fail the same way. Rerun fetches a new batch.`));
  } else if (failed && !run.retried_by) {
    buttons.push(act("Retry", "", "retry"));
  }
  if (FINAL.has(run.status)) {
    buttons.push(act("Rerun", "secondary", "rerun",
      [`Rerun ${batch}?`, `A new run of ${run.pipeline} starts from the first step, in a new batch.`, "Rerun"]));
  } else {
    buttons.push(act("Cancel", "danger", "cancel",
      [`Cancel the run of ${batch}?`, "Its running step is stopped at once; Retry resumes it later in the same batch.", "Cancel run"]));
  }
  return buttons;
}

// The pipeline definitions (config fingerprints) the run's steps ran under; more than one: its config
// changed while it ran.
function definitionsFact(run) {
  const defs = run.definitions || [];
  if (defs.length === 0) return [];
  if (defs.length === 1) return [h("dt", {}, "Definition"), h("dd", {}, h("code", {}, defs[0]))];
  const which = defs.map((f) => `${(run.steps || []).filter((s) => s.fingerprint === f).map((s) => s.name).join(", ")} under ${f}`);
  return [h("dt", {}, "Definition"), h("dd", { class: "changed", id: "run-definitions" },
    h("span", { class: "badge conflict" }, "config changed during the run"), " ", which.join("; "))];
}

function objectLink(uri) {
  if (typeof uri !== "string") return null;
  if (uri.startsWith("gs://")) {
    const path = uri.slice(5);
    return h("a", { href: `https://console.cloud.google.com/storage/browser/_details/${path}`, target: "_blank", rel: "noopener" }, breakable(uri));
  }
  return h("code", {}, breakable(uri));
}

function stepRow(s) {
  const out = s.output || {};
  const outputs = [];
  if (out.object) outputs.push(h("div", { class: "object" }, objectLink(out.object)));
  if (out.table) outputs.push(h("div", {}, "table ", h("code", {}, breakable(out.table))));
  if (out.write === "merge") {
    outputs.push(h("div", { class: "merge" },
      `${out.inserted} inserted, ${out.updated} updated, ${out.unchanged} unchanged, ${out.deleted} deleted`));
  }
  if (out.skipped && Object.keys(out.skipped).length) {
    const what = Object.entries(out.skipped).map(([k, v]) => `${k}: ${v}`).join(", ");
    const keys = (out.skipped_keys || []).length ? ` (e.g. ${out.skipped_keys.join(", ")})` : "";
    outputs.push(h("div", { class: "skipped" }, `left out: ${what}${keys}`));
  }
  if (out.reused_from_run || s.reused_from_run) outputs.push(h("div", { class: "muted small" }, "reused from ", link(`/runs/${s.reused_from_run}`, shortId(s.reused_from_run))));
  const attempts = (s.attempt_log || []).map((a) =>
    h("li", {}, `#${a.attempt} ${a.outcome} on ${a.worker_id}, ${fmtDuration(between(a.started_at, a.finished_at))}${a.fingerprint ? `, definition ${a.fingerprint}` : ""}`,
      a.error ? h("div", { class: "error" }, a.error) : null));
  return h("tr", { "data-step": s.name },
    cell("Step", h("strong", {}, s.name)),
    cell("State", badge(s.status)),
    cell("Attempts", num(`${s.attempts} / ${s.max_attempts}`), attempts.length ? h("ul", { class: "attempts" }, attempts) : null),
    cell("Duration", num(fmtDuration(between(s.started_at, s.finished_at)))),
    cell("Rows", num(out.rows ?? "")),
    cell("Output", ...outputs),
    cell("Error", s.error ? h("span", { class: "error" }, s.error) : ""));
}
