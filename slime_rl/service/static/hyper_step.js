// Wizard step 4: the hyperparameter form, generated from /api/options `hyperparameters`
// ({name, label, type: int|float|bool|choice, default, min, max, choices, help}).
//
// The checks here are for quick feedback only; the server checks every value again and its 400 names the
// field (`hyperparameters.lr_multiplier`), which the wizard marks on this form. Only values the user changed
// are sent: a value left at its default lets the task's and algorithm's presets choose (as on the command line).

import { el, fmtNumber } from "./dom.js";
import { clearFieldError, errorBox, field, setFieldError } from "./fields.js";

export function inputId(name) {
  return `hp-${name}`;
}

function describeRange(h) {
  if (h.min === null || h.min === undefined) return "";
  return `${fmtNumber(h.min)} – ${fmtNumber(h.max)}`;
}

function buildInput(h, draft) {
  const id = inputId(h.name);
  const stored = draft.hyper[h.name];
  const onchange = () => { draft.hyper[h.name] = readRaw(h, input); check(h, input); markChanged(h, input); };
  let input;
  if (h.type === "bool") {
    input = el("input", { type: "checkbox", id, checked: stored ?? Boolean(h.default), onchange });
  } else if (h.type === "choice") {
    input = el("select", { id, onchange }, (h.choices || []).map((c) => el("option", { value: c }, c)));
    input.value = stored ?? h.default;
  } else {
    input = el("input", {
      type: "number", id, name: h.name, value: stored ?? String(h.default),
      min: h.min ?? null, max: h.max ?? null, step: h.type === "int" ? "1" : "any", oninput: onchange,
    });
  }
  markChanged(h, input);
  return input;
}

/** The input's value as typed: a boolean, a choice string, or the number's text (checked by `check`). */
function readRaw(h, input) {
  if (h.type === "bool") return input.checked;
  return input.value;
}

/** The typed value, or throws a message. */
function parse(h, raw) {
  if (h.type === "bool") return Boolean(raw);
  if (h.type === "choice") {
    if (!(h.choices || []).includes(raw)) throw `choose one of ${(h.choices || []).join(", ")}`;
    return raw;
  }
  const text = String(raw).trim();
  if (text === "") throw "enter a number";
  const x = Number(text);
  if (!Number.isFinite(x)) throw "enter a number";
  if (h.type === "int" && !Number.isInteger(x)) throw "enter a whole number";
  if ((h.min !== null && h.min !== undefined && x < h.min) || (h.max !== null && h.max !== undefined && x > h.max)) {
    throw `must be in ${describeRange(h)}`;
  }
  return x;
}

function check(h, input) {
  try {
    parse(h, readRaw(h, input));
    clearFieldError(input);
    return true;
  } catch (message) {
    setFieldError(input, String(message));
    return false;
  }
}

function isDefault(h, raw) {
  try {
    return parse(h, raw) === h.default;
  } catch {
    return false;
  }
}

function markChanged(h, input) {
  input.closest?.(".field")?.classList.toggle("changed", !isDefault(h, readRaw(h, input)));
}

/** The hyperparameters the user changed from their defaults, typed: {name: value}. */
export function changedHyperparameters(options, draft) {
  const out = {};
  for (const h of options.hyperparameters) {
    if (!(h.name in draft.hyper) || isDefault(h, draft.hyper[h.name])) continue;
    try {
      out[h.name] = parse(h, draft.hyper[h.name]);
    } catch {
      out[h.name] = draft.hyper[h.name]; // step 4 blocks this; if it slips through, the server names it
    }
  }
  return out;
}

export function hyperStep({ options, draft }) {
  const inputs = [];
  const fields = options.hyperparameters.map((h) => {
    const input = buildInput(h, draft);
    inputs.push([h, input]);
    const range = describeRange(h);
    const help = [h.help, range && `range ${range}`, `default ${h.type === "bool" ? h.default : fmtNumber(h.default)}`]
      .filter(Boolean).join(" · ");
    const f = field(h.label, input, help);
    if (h.type === "bool") f.classList.add("field-bool");
    return f;
  });
  const reset = el("button", { type: "button", class: "secondary", id: "hp-reset" }, "Reset to defaults");
  reset.addEventListener("click", () => {
    draft.hyper = {};
    for (const [h, input] of inputs) {
      if (h.type === "bool") input.checked = Boolean(h.default);
      else input.value = String(h.default);
      clearFieldError(input);
      markChanged(h, input);
    }
  });
  const node = el("div", {},
    el("p", { class: "help" }, "Defaults suit the tiny model. Changed values are highlighted; the others are left "
      + "to the task's and algorithm's presets."),
    el("div", { class: "hp-grid" }, fields),
    el("div", { class: "row" }, reset),
    errorBox("step-4-error"));
  for (const [h, input] of inputs) markChanged(h, input); // now that each input sits in its .field
  return {
    node,
    validate() {
      // Check every field (not just up to the first bad one) so all the errors show at once.
      return inputs.map(([h, input]) => check(h, input)).every(Boolean);
    },
  };
}
