// A small SVG line chart: a few series of (x, y) points over a shared step axis, with gridlines and tick
// labels (the compare page draws one legend for all its charts). Written here rather than pulled from a
// charting library: the page must work offline, and the whole chart is ~120 lines.
//
// The chart's container gets `data-points` = the number of points drawn (all series together), which the
// browser test reads to know the curves are live.

import { el, svg, replace, fmtNumber } from "./dom.js";

const W = 420; // viewBox units; the SVG scales to its card's width
const H = 210;
const PAD = { left: 48, right: 12, top: 10, bottom: 30 };
export const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const MAX_MARKERS = 80; // above this many points per series, draw the line only

/** Round tick values in [lo, hi], 1, 2 or 5 times a power of ten apart: the finest step giving at most
 * `count` + 1 ticks (so a range never gets a single tick). */
export function niceTicks(lo, hi, count = 5) {
  const span = hi - lo;
  const mag = 10 ** Math.floor(Math.log10(span / Math.max(1, count)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= count + 1);
  const ticks = [];
  for (let t = Math.ceil(lo / step - 1e-9) * step; t <= hi + step * 1e-9; t += step) {
    ticks.push(Math.abs(t) < step * 1e-9 ? 0 : Number(t.toPrecision(12)));
  }
  return ticks;
}

/** The y range to draw: `fixed` ([0, 1] for accuracies) widened to the data if it falls outside. */
function yDomain(values, fixed) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (fixed) {
    lo = Math.min(lo, fixed[0]);
    hi = Math.max(hi, fixed[1]);
  }
  if (lo === hi) {
    const d = lo === 0 ? 1 : Math.abs(lo) * 0.1;
    lo -= d;
    hi += d;
  } else if (!fixed) {
    const d = (hi - lo) * 0.05;
    lo -= d;
    hi += d;
  }
  return [lo, hi];
}

/**
 * Draw `series` ([{label, color?, points: [[x, y], ...]}]) into `container` (its previous drawing replaced).
 * opts: {xDomain, yDomain: [lo, hi] ranges to always include (a run's whole step range, [0, 1] for
 * accuracies), emptyText: what an empty chart says}.
 */
export function drawLineChart(container, series, opts = {}) {
  const drawn = series.map((s, i) => ({ ...s, color: s.color || COLORS[i % COLORS.length],
    points: s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y)).sort((a, b) => a[0] - b[0]) }));
  const all = drawn.flatMap((s) => s.points);
  container.dataset.points = String(all.length);
  if (all.length === 0) {
    replace(container, el("div", { class: "chart-empty" }, opts.emptyText || "no data yet"));
    return;
  }
  const xs = all.map((p) => p[0]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  if (opts.xDomain) [x0, x1] = [Math.min(x0, opts.xDomain[0]), Math.max(x1, opts.xDomain[1])];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  const [y0, y1] = yDomain(all.map((p) => p[1]), opts.yDomain);
  const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const sy = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);

  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart-svg", role: "img" });
  root.append(...axes(x0, x1, y0, y1, sx, sy));
  for (const s of drawn) {
    if (s.points.length === 0) continue;
    const d = s.points.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    root.append(svg("path", { d, class: "chart-line", stroke: s.color }));
    if (s.points.length <= MAX_MARKERS) {
      for (const [x, y] of s.points) {
        root.append(svg("circle", { cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 2.5, fill: s.color },
          svg("title", {}, `${s.label ? s.label + " — " : ""}step ${fmtNumber(x)}: ${fmtNumber(y)}`)));
      }
    }
  }
  replace(container, root);
}

function axes(x0, x1, y0, y1, sx, sy) {
  const parts = [];
  for (const t of niceTicks(y0, y1, 4)) {
    parts.push(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t), class: "chart-gridline" }));
    parts.push(svg("text", { x: PAD.left - 6, y: sy(t) + 4, class: "chart-tick", "text-anchor": "end" },
      fmtNumber(t)));
  }
  // Steps are integers: no fractional ticks on a short run.
  const whole = niceTicks(x0, x1, 6).filter((t) => Number.isInteger(t));
  const xTicks = whole.length ? whole : [x0, x1];
  for (const t of xTicks) {
    parts.push(svg("line", { x1: sx(t), x2: sx(t), y1: H - PAD.bottom, y2: H - PAD.bottom + 4, class: "chart-axis" }));
    parts.push(svg("text", { x: sx(t), y: H - PAD.bottom + 16, class: "chart-tick", "text-anchor": "middle" },
      fmtNumber(t)));
  }
  parts.push(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom,
    class: "chart-axis" }));
  parts.push(svg("text", { x: W - PAD.right, y: H - 2, class: "chart-tick", "text-anchor": "end" }, "step"));
  return parts;
}

/** The last finite value of `key` in metrics rows, or null. */
export function lastValue(rows, key) {
  for (let i = rows.length - 1; i >= 0; i--) {
    const v = rows[i][key];
    if (typeof v === "number" && Number.isFinite(v)) return v;
  }
  return null;
}

/** Metrics rows -> [[step, value], ...] for one key (rows without it are skipped). */
export function pointsOf(rows, key) {
  return rows.filter((r) => typeof r[key] === "number" && typeof r.step === "number").map((r) => [r.step, r[key]]);
}
