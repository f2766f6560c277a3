// The job list (#/jobs): filters (sent to GET /api/jobs as query parameters), a table refreshed every 2 s,
// and checkboxes to pick jobs for the compare page. Picks and filters survive the refreshes.

import { api, getOptions } from "./api.js";
import { el, replace, every, fmtTime, statusBadge, progressBar } from "./dom.js";

const REFRESH_MS = 2000;
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const SEARCH_DEBOUNCE_MS = 300;

function select(id, label, items) {
  return el("select", { id, "aria-label": label },
    el("option", { value: "" }, `${label}: all`), items.map(([value, text]) => el("option", { value }, text)));
}

export async function jobsView(root) {
  const options = await getOptions();
  const picked = new Set();
  const filters = {
    status: select("filter-status", "Status", STATUSES.map((s) => [s, s])),
    algorithm: select("filter-algorithm", "Algorithm", options.algorithms.map((a) => [a.id, a.id])),
    task: select("filter-task", "Task", options.tasks.map((t) => [t.id, t.id])),
    q: el("input", { type: "search", id: "filter-q", placeholder: "Search names…", "aria-label": "Search" }),
  };
  const body = el("tbody", {});
  const count = el("span", { class: "help", id: "jobs-count" });
  const compare = el("button", { type: "button", id: "compare", class: "primary", disabled: true }, "Compare");
  const updateCompare = () => {
    compare.disabled = picked.size < 2;
    compare.textContent = picked.size ? `Compare (${picked.size})` : "Compare";
  };
  compare.addEventListener("click", () => {
    location.hash = `#/compare?ids=${[...picked].map(encodeURIComponent).join(",")}`;
  });

  function row(job) {
    const box = el("input", { type: "checkbox", id: `pick-${job.id}`, checked: picked.has(job.id),
      "aria-label": `pick ${job.name || job.id}` });
    box.addEventListener("change", () => {
      if (box.checked) picked.add(job.id);
      else picked.delete(job.id);
      updateCompare();
    });
    return el("tr", { dataset: { jobId: job.id } },
      el("td", {}, box),
      el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.name || job.id)),
      el("td", {}, statusBadge(job.status)),
      el("td", {}, job.model?.id ?? ""),
      el("td", {}, job.algorithm ?? ""),
      el("td", {}, job.task?.id ?? ""),
      el("td", { class: "nowrap" }, fmtTime(job.created_at)),
      el("td", {}, progressBar(job.progress)));
  }

  let shown = null; // the answer on screen: rows are rebuilt only when it changes (keeps focus and clicks)
  async function refresh() {
    const params = Object.fromEntries(Object.entries(filters).map(([k, input]) => [k, input.value.trim()]));
    const { jobs } = await api("GET", "/api/jobs", { params });
    const answer = JSON.stringify(jobs);
    if (answer === shown) return;
    shown = answer;
    if (jobs.length === 0) {
      replace(body, el("tr", {}, el("td", { colspan: 8, class: "empty" }, "No jobs match. ",
        el("a", { href: "#/new" }, "Start a new job"), ".")));
    } else {
      replace(body, jobs.map(row));
    }
    replace(count, `${jobs.length} job${jobs.length === 1 ? "" : "s"}`);
  }

  let poller = every(REFRESH_MS, refresh);
  const restart = () => { poller.stop(); poller = every(REFRESH_MS, refresh); };
  for (const key of ["status", "algorithm", "task"]) filters[key].addEventListener("change", restart);
  let debounce = null;
  filters.q.addEventListener("input", () => {
    clearTimeout(debounce);
    debounce = setTimeout(restart, SEARCH_DEBOUNCE_MS);
  });

  replace(root,
    el("div", { class: "title-row" },
      el("h1", {}, "Jobs"), el("a", { href: "#/new", class: "button primary" }, "New job")),
    el("div", { class: "filters" }, filters.status, filters.algorithm, filters.task, filters.q, count, compare),
    el("table", { class: "data jobs", id: "jobs-table" },
      el("thead", {}, el("tr", {}, ["", "Name", "Status", "Model", "Algorithm", "Task", "Created", "Progress"]
        .map((h) => el("th", {}, h)))),
      body));
  return { dispose() { poller.stop(); clearTimeout(debounce); } };
}
