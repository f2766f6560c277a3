// The five curves the job page and the compare page draw, and their chart containers.
//
// Container ids are stable for tests: "rollout/reward_mean" -> #chart-rollout-reward_mean.

import { el, fmtNumber } from "./dom.js";
import { drawLineChart, lastValue, pointsOf } from "./chart.js";

const METRICS = [
  { key: "rollout/reward_mean", title: "Reward (mean)" },
  { key: "rollout/response_length", title: "Response length (tokens)" },
  { key: "rollout/format_accuracy", title: "Format accuracy", yDomain: [0, 1] },
  { key: "rollout/answer_accuracy", title: "Answer accuracy", yDomain: [0, 1] },
  { key: "val/accuracy", title: "Validation accuracy", yDomain: [0, 1] },
];

function chartId(key) {
  return `chart-${key.replace(/\//g, "-")}`;
}

/** The five chart cards; returns {node, draw}. */
export function chartGrid() {
  const cards = METRICS.map((m) => {
    const body = el("div", { class: "chart", id: chartId(m.key), dataset: { points: "0" } });
    const latest = el("span", { class: "chart-latest" });
    return { m, body, latest, node: el("figure", { class: "chart-card" },
      el("figcaption", {}, el("span", {}, m.title), latest), body) };
  });
  return {
    node: el("div", { class: "chart-grid" }, cards.map((c) => c.node)),
    /**
     * seriesFor(metric) -> [{label, color?, points}]; latestOf(metric) -> a value for the caption (optional);
     * xDomain: the step range every chart shows (so the five line up); emptyText for a chart without points.
     */
    draw(seriesFor, { latestOf, xDomain, emptyText } = {}) {
      for (const c of cards) {
        drawLineChart(c.body, seriesFor(c.m), { xDomain, yDomain: c.m.yDomain, emptyText });
        const v = latestOf ? latestOf(c.m) : null;
        c.latest.textContent = v === null || v === undefined ? "" : `latest ${fmtNumber(v)}`;
      }
    },
  };
}

/** Draw one job's metrics rows into a chart grid, over its whole planned step range. */
export function drawJob(grid, rows, totalSteps, running) {
  grid.draw((m) => [{ label: "", points: pointsOf(rows, m.key) }], {
    latestOf: (m) => lastValue(rows, m.key), xDomain: totalSteps ? [1, totalSteps] : null,
    emptyText: running ? "no data yet" : "not logged by this run",
  });
}
