// The job page (#/jobs/<id>): step 6, monitor (status, progress, live curves, time shares, log tail; cancel
// and resume), and step 7, deploy (deploy.js).
//
// While the job is queued or running the page refreshes every 2 s; once it reaches a final status it
// refreshes once more (for the last metrics and log lines) and stops, until Cancel or Resume changes it.

import { api } from "./api.js";
import { el, replace, every, fmtNumber, fmtPercent, fmtTime, fmtDuration, statusBadge, progressBar } from "./dom.js";
import { chartGrid, drawJob } from "./metrics.js";
import { deploySection } from "./deploy.js";
import { stepper, stepPanel } from "./wizard.js";

const REFRESH_MS = 2000;
const ACTIVE = new Set(["queued", "running"]);
const LOG_TAIL = 200;

function timeTable(tt) {
  if (!tt?.phases?.length) return el("p", { class: "help" }, "Available once training steps have run.");
  return el("table", { class: "data" },
    el("thead", {}, el("tr", {}, ["Phase", "Seconds", "Share", "Tokens/s"].map((h) => el("th", {}, h)))),
    el("tbody", {}, tt.phases.map((p) => el("tr", {},
      el("td", { title: p.phase }, p.label || p.phase),
      el("td", { class: "num" }, fmtNumber(p.seconds)),
      el("td", { class: "num share" },
        el("span", { class: "share-bar", style: { width: `${Math.round(100 * (p.share || 0))}%` } }),
        el("span", {}, fmtPercent(p.share))),
      el("td", { class: "num" }, fmtNumber(p.tokens_per_s))))));
}

function header(job) {
  const end = job.ended_at || (ACTIVE.has(job.status) ? Date.now() / 1000 : null);
  const ran = job.started_at && end ? fmtDuration(end - job.started_at) : "–";
  const pathOf = (x) => (x?.path ? ` (${x.path})` : "");
  return [
    el("h1", {}, job.name || job.id, " ", statusBadge(job.status, { id: "job-status" })),
    el("div", { class: "meta" },
      el("span", {}, "id ", el("code", {}, job.id)),
      el("span", {}, "model ", el("strong", {}, job.model?.id ?? "?"), pathOf(job.model)),
      el("span", {}, "algorithm ", el("strong", {}, job.algorithm)),
      el("span", {}, "task ", el("strong", {}, job.task?.id ?? "?"), pathOf(job.task)),
      el("span", {}, "created ", fmtTime(job.created_at)),
      el("span", {}, "ran ", ran)),
  ];
}

export async function jobView(root, [jobId]) {
  const head = el("div", {});
  const progress = el("div", { class: "progress-row" });
  const error = el("div", { class: "error-box", id: "job-error", hidden: true });
  const cancel = el("button", { type: "button", id: "cancel", class: "danger", hidden: true }, "Cancel");
  const resume = el("button", { type: "button", id: "resume", class: "secondary", hidden: true },
    "Resume from checkpoint");
  const actionError = el("div", { class: "error-box", id: "action-error" });
  const charts = chartGrid();
  const times = el("div", { id: "time-table" });
  const log = el("pre", { id: "log-tail", class: "log" });
  const deploy = deploySection(jobId);
  const path = `/api/jobs/${encodeURIComponent(jobId)}`;

  const monitor = stepPanel(6, el("div", {},
    progress, error, el("div", { class: "row" }, cancel, resume), actionError,
    el("h3", {}, "Curves"), charts.node,
    el("h3", {}, "Where the time went"), times,
    el("h3", {}, `Log (last ${LOG_TAIL} lines)`), log));
  const strip = el("div", {});
  replace(root, head, strip, monitor, deploy.node);

  let shown = null; // the job as last drawn: an ended job that has not changed is not redrawn
  function renderJob(job) {
    deploy.update(job);
    const key = JSON.stringify(job);
    if (key === shown && !ACTIVE.has(job.status)) return;
    shown = key;
    replace(head, header(job));
    replace(strip, stepper(job.status === "succeeded" ? 7 : 6));
    replace(progress, el("span", {}, "Progress "), progressBar(job.progress, { id: "job-progress" }));
    error.hidden = !job.error;
    replace(error, job.error ? `${job.status === "failed" ? "Failed: " : ""}${job.error}` : "");
    cancel.hidden = !ACTIVE.has(job.status);
    resume.hidden = !(["failed", "cancelled"].includes(job.status) && job.checkpoint);
    replace(times, timeTable(job.time_table));
  }

  async function refresh() {
    const job = await api("GET", path);
    renderJob(job);
    const [metrics, logTail] = await Promise.all([
      api("GET", `${path}/metrics`),
      api("GET", `${path}/log`, { params: { tail: LOG_TAIL } }),
    ]);
    drawJob(charts, metrics.rows || [], job.progress?.total_steps, ACTIVE.has(job.status));
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = (logTail.lines || []).join("\n");
    if (atBottom) log.scrollTop = log.scrollHeight;
    return ACTIVE.has(job.status);
  }

  let poller = null;
  const startPolling = () => { poller?.stop(); poller = every(REFRESH_MS, refresh); };

  async function act(button, verb) {
    button.disabled = true;
    replace(actionError);
    try {
      renderJob(await api("POST", `${path}/${verb}`));
      startPolling();
    } catch (err) {
      replace(actionError, err.message);
    } finally {
      button.disabled = false;
    }
  }
  cancel.addEventListener("click", () => act(cancel, "cancel"));
  resume.addEventListener("click", () => act(resume, "resume"));

  renderJob(await api("GET", path)); // a missing job fails the mount (the router shows the error)
  startPolling();
  return { dispose() { poller?.stop(); deploy.dispose(); } };
}
