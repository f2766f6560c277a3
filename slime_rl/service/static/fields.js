// Form-field helpers shared by the wizard's steps: a labelled field with its help text and error slot, and
// showing or clearing an error on one input (the server's 400 names the field; the page marks that input).

import { el, replace } from "./dom.js";

/** A labelled field: label, the input, optional help, and an error slot `<input id>-error`. */
export function field(label, input, help) {
  return el("div", { class: "field" },
    el("label", { for: input.id }, label),
    input,
    help ? el("div", { class: "help" }, help) : null,
    el("div", { class: "field-error", id: `${input.id}-error`, role: "alert" }));
}

/** Mark `input` invalid and show `message` in its error slot (or in `fallbackId`'s when it has none). */
export function setFieldError(input, message, fallbackId) {
  if (input) {
    input.classList.add("invalid");
    input.setAttribute("aria-invalid", "true");
  }
  const slot = document.getElementById(input ? `${input.id}-error` : "") || document.getElementById(fallbackId);
  if (slot) replace(slot, message);
}

export function clearFieldError(input) {
  if (!input) return;
  input.classList.remove("invalid");
  input.removeAttribute("aria-invalid");
  const slot = document.getElementById(`${input.id}-error`);
  if (slot) slot.replaceChildren();
}

/** A message block for errors not tied to one input (shown at the top of a step). */
export function errorBox(id) {
  return el("div", { class: "error-box", id, role: "alert" });
}
