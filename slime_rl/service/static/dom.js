// DOM building and number/time formatting shared by every page.
//
// Every string goes into the page as a text node or an attribute value, never through innerHTML, so text
// that came from the server (job names, errors, log lines, model replies) cannot become markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    // Styles through the CSSOM, which a Content-Security-Policy without 'unsafe-inline' still allows.
    else if (key === "style") Object.assign(node.style, value);
    else if (key in PROPERTIES && !(node instanceof SVGElement)) node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

// Set as DOM properties (their live state), not as attributes (their initial state).
const PROPERTIES = { value: 1, checked: 1, disabled: 1, selected: 1, hidden: 1 };

/** Append children: strings and numbers become text nodes; null/false are skipped; arrays are flattened. */
export function append(node, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** el("td", {class: "num"}, "3") -> <td class="num">3</td> */
export function el(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** The same for SVG elements (charts). */
export function svg(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replace all children of `node`. */
export function replace(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

/** A number for people: integers with thousands separators, others to 3-4 significant digits. */
export function fmtNumber(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (!Number.isFinite(x)) return x > 0 ? "∞" : "-∞";
  if (Number.isInteger(x) && Math.abs(x) < 1e15) return x.toLocaleString("en-US");
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(2);
  if (a >= 100) return x.toLocaleString("en-US", { maximumFractionDigits: 1 });
  return String(Number(x.toPrecision(3)));
}

/** A share in [0, 1] as a percentage. */
export function fmtPercent(share) {
  return share === null || share === undefined ? "–" : `${(100 * share).toFixed(1)}%`;
}

/** Unix seconds -> "2026-12-07 18:03:35" in the browser's time zone. */
export function fmtTime(unix) {
  if (!unix) return "–";
  const d = new Date(unix * 1000);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`
    + `:${p(d.getSeconds())}`;
}

/** Seconds -> "1h 02m", "3m 07s", "12.4s". */
export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(1)}s`;
  const s = Math.round(seconds);
  const p = (n) => String(n).padStart(2, "0");
  if (s < 3600) return `${Math.floor(s / 60)}m ${p(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${p(Math.floor((s % 3600) / 60))}m`;
}

/** A status word as a coloured badge. */
export function statusBadge(status, attrs = {}) {
  return el("span", { class: `badge status-${status}`, ...attrs }, status);
}

/** A progress bar with "step / total" beside it. */
export function progressBar(progress, attrs = {}) {
  const step = progress?.step ?? 0;
  const total = progress?.total_steps ?? 0;
  const pct = total > 0 ? Math.min(100, (100 * step) / total) : 0;
  return el("span", { class: "progress", ...attrs },
    el("span", { class: "progress-track" }, el("span", { class: "progress-fill", style: { width: `${pct}%` } })),
    el("span", { class: "progress-text" }, total > 0 ? `${step} / ${total}` : "–"));
}

/**
 * Call `fn` now (or after `ms` when `now` is false) and then every `ms` after each call finishes (never two at
 * once), until `stop()`. `fn` returning false stops the loop (e.g. a job that reached a final status).
 */
export function every(ms, fn, { now = true } = {}) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    let again = true;
    try {
      again = (await fn()) !== false;
    } catch (err) {
      console.error(err);
    }
    if (!stopped && again) timer = setTimeout(tick, ms);
  };
  timer = setTimeout(tick, now ? 0 : ms);
  return { stop() { stopped = true; clearTimeout(timer); } };
}
