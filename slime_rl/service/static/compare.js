// The compare page (#/compare?ids=a,b,...): the five curves with one line per job and a legend.
// Refreshes every 2 s while any of the jobs is still queued or running.

import { api } from "./api.js";
import { el, replace, every, statusBadge } from "./dom.js";
import { COLORS, pointsOf } from "./chart.js";
import { chartGrid } from "./metrics.js";

const REFRESH_MS = 2000;
const ACTIVE = new Set(["queued", "running"]);

export async function compareView(root, _match, query) {
  const ids = (query.get("ids") || "").split(",").map((s) => s.trim()).filter(Boolean);
  if (ids.length === 0) {
    replace(root, el("h1", {}, "Compare"), el("p", {}, "Pick jobs on the ", el("a", { href: "#/jobs" }, "job list"),
      " and press Compare."));
    return { dispose() {} };
  }
  const charts = chartGrid();
  const jobsList = el("ul", { class: "compare-jobs", id: "compare-jobs", "aria-label": "legend" });
  replace(root, el("h1", {}, `Compare ${ids.length} jobs`), jobsList, charts.node);

  async function refresh() {
    const loaded = await Promise.all(ids.map(async (id) => {
      const path = `/api/jobs/${encodeURIComponent(id)}`;
      const [job, metrics] = await Promise.all([api("GET", path), api("GET", `${path}/metrics`)]);
      return { job, rows: metrics.rows || [] };
    }));
    const color = (i) => COLORS[i % COLORS.length];
    replace(jobsList, loaded.map(({ job }, i) => el("li", {},
      el("span", { class: "swatch", style: { background: color(i) } }),
      el("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.name || job.id), " ",
      statusBadge(job.status), " ", el("span", { class: "help" }, `${job.algorithm} · ${job.task?.id ?? ""}`))));
    const total = Math.max(1, ...loaded.map(({ job }) => job.progress?.total_steps || 1));
    charts.draw((m) => loaded.map(({ job, rows }, i) => ({
      label: job.name || job.id, color: color(i), points: pointsOf(rows, m.key),
    })), { xDomain: [1, total] });
    return loaded.some(({ job }) => ACTIVE.has(job.status));
  }

  // The first load is awaited, so a wrong id shows as the page's error; later refreshes keep trying.
  const poller = (await refresh()) ? every(REFRESH_MS, refresh, { now: false }) : null;
  return { dispose() { poller?.stop(); } };
}
