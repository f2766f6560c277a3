// The new-job wizard (#/new): steps 1-5 of the seven (6 monitor and 7 deploy live on the job page).
//
// One panel is shown at a time; Next checks the step before moving on. The choices live in a module-level
// draft, so leaving the wizard (to look at the job list) and coming back keeps them until a job is submitted.
// The server is the authority on every value: a 400 on submit names a field, and the wizard goes back to the
// step that owns it and marks that input.

import { api, getOptions } from "./api.js";
import { el, replace, fmtNumber } from "./dom.js";
import { errorBox, field, setFieldError, clearFieldError } from "./fields.js";
import { uploadStep } from "./upload_step.js";
import { hyperStep, changedHyperparameters, inputId } from "./hyper_step.js";

const STEPS = ["Model", "Algorithm & task", "Data", "Hyperparameters", "Review & submit", "Monitor", "Deploy"];
const DOTTED_PATH = /^[A-Za-z_][\w.]*:[A-Za-z_]\w*$/;

function freshDraft() {
  return { step: 1, reached: 1, model: "tiny", modelPath: "", algorithm: "GRPO", task: "arithmetic", taskPath: "",
    uploads: { train: null, val: null }, hyper: {}, name: "" };
}

let draft = freshDraft();

/**
 * The seven steps as a strip across the top, `current` highlighted. With `go`, the wizard's steps up to
 * `reached` (the furthest one visited) are links: going back to change one choice need not repeat the rest.
 */
export function stepper(current, go, reached = current) {
  return el("ol", { class: "stepper" }, STEPS.map((title, i) => {
    const n = i + 1;
    const cls = n === current ? "current" : n <= Math.max(current - 1, reached) ? "done" : "";
    const label = [el("span", { class: "step-num" }, n), title];
    const clickable = go && n !== current && n <= reached && n <= 5;
    const onclick = (e) => { e.preventDefault(); go(n); };
    return el("li", { class: cls }, clickable ? el("a", { href: "#/new", onclick }, label) : label);
  }));
}

/** A step's panel: heading "Step N · title", body, Back / Next (or a custom action) buttons. */
export function stepPanel(n, body, buttons) {
  return el("section", { class: "panel step", id: `step-${n}` },
    el("h2", {}, `Step ${n} · ${STEPS[n - 1]}`), body, buttons ? el("div", { class: "step-nav" }, buttons) : null);
}

function modelStep({ options }) {
  const pathInput = el("input", { type: "text", id: "model-path-input", value: draft.modelPath,
    placeholder: "/models/my-checkpoint",
    oninput: (e) => { draft.modelPath = e.target.value; clearFieldError(e.target); } });
  const pathField = field("Checkpoint directory on the service's machine (with config.json)", pathInput);
  const radios = options.models.map((m) => {
    const radio = el("input", { type: "radio", name: "model", id: `model-${m.id}`, value: m.id,
      checked: draft.model === m.id });
    radio.addEventListener("change", () => { draft.model = m.id; sync(); });
    return el("label", { class: "choice", for: radio.id }, radio,
      el("span", {}, el("strong", {}, m.id), " — ", m.label));
  });
  const sync = () => { pathField.hidden = !options.models.find((m) => m.id === draft.model)?.needs_path; };
  sync();
  return {
    node: el("div", {}, el("div", { class: "choices" }, radios), pathField, errorBox("step-1-error")),
    validate() {
      const needsPath = options.models.find((m) => m.id === draft.model)?.needs_path;
      if (needsPath && !draft.modelPath.trim()) {
        setFieldError(pathInput, "Enter the checkpoint directory.");
        return false;
      }
      return true;
    },
  };
}

function taskStep({ options }) {
  const algo = el("select", { id: "algorithm" }, options.algorithms.map((a) => el("option", { value: a.id }, a.label)));
  algo.value = draft.algorithm;
  algo.addEventListener("change", () => { draft.algorithm = algo.value; });
  const task = el("select", { id: "task" }, options.tasks.map((t) => el("option", { value: t.id }, t.label)));
  task.value = draft.task;
  const pathInput = el("input", { type: "text", id: "task-path", value: draft.taskPath,
    placeholder: "my_pkg.tasks:make_task",
    oninput: (e) => { draft.taskPath = e.target.value; clearFieldError(e.target); } });
  const pathField = field("Task factory (dotted path pkg.module:factory, importable by the service)", pathInput);
  const dataNote = el("div", { class: "help", id: "task-data" });
  const sync = () => {
    const t = options.tasks.find((x) => x.id === draft.task);
    pathField.hidden = !t?.needs_path;
    replace(dataNote, t?.data === "required" ? "This task needs your training file (step 3)."
      : "This task can generate its data; your files are optional (step 3).");
  };
  task.addEventListener("change", () => {
    draft.task = task.value;
    // Uploads were checked against the previous task's row format: drop them.
    for (const kind of ["train", "val"]) {
      if (draft.uploads[kind] && draft.uploads[kind].task !== draft.task) draft.uploads[kind] = null;
    }
    sync();
  });
  sync();
  return {
    node: el("div", {}, field("Algorithm", algo), field("Task and grader", task), dataNote, pathField,
      errorBox("step-2-error")),
    validate() {
      const t = options.tasks.find((x) => x.id === draft.task);
      if (t?.needs_path && !DOTTED_PATH.test(draft.taskPath.trim())) {
        setFieldError(pathInput, "Expected a dotted path pkg.module:factory.");
        return false;
      }
      return true;
    },
  };
}

/** The POST /api/jobs body from the draft. */
function jobRequest(options) {
  const model = options.models.find((m) => m.id === draft.model);
  const task = options.tasks.find((t) => t.id === draft.task);
  return {
    name: draft.name.trim() || defaultName(),
    model: { id: draft.model, ...(model?.needs_path ? { path: draft.modelPath.trim() } : {}) },
    algorithm: draft.algorithm,
    task: { id: draft.task, ...(task?.needs_path ? { path: draft.taskPath.trim() } : {}) },
    train_upload: draft.uploads.train?.id ?? null,
    val_upload: draft.uploads.val?.id ?? null,
    hyperparameters: changedHyperparameters(options, draft),
  };
}

function defaultName() {
  return `${draft.model}-${draft.algorithm.toLowerCase()}-${draft.task}`;
}

function reviewStep({ options }) {
  const summary = el("dl", { class: "summary", id: "review" });
  const name = el("input", { type: "text", id: "job-name", maxlength: 120, value: draft.name,
    oninput: (e) => { draft.name = e.target.value; clearFieldError(e.target); } });
  return {
    node: el("div", {}, summary, field("Job name", name, "Shown in the job list; defaults to model-algorithm-task."),
      errorBox("submit-error")),
    show() {
      name.placeholder = defaultName();
      const req = jobRequest(options);
      const up = (u) => (u ? `${u.filename} (${fmtNumber(u.rows)} rows)` : "none — generated by the task");
      const hp = Object.entries(req.hyperparameters);
      const label = (list, id) => list.find((x) => x.id === id)?.label ?? id;
      replace(summary,
        el("dt", {}, "Model"),
        el("dd", {}, label(options.models, req.model.id), req.model.path ? ` — ${req.model.path}` : ""),
        el("dt", {}, "Algorithm"), el("dd", {}, label(options.algorithms, req.algorithm)),
        el("dt", {}, "Task"),
        el("dd", {}, label(options.tasks, req.task.id), req.task.path ? ` — ${req.task.path}` : ""),
        el("dt", {}, "Training data"), el("dd", {}, up(draft.uploads.train)),
        el("dt", {}, "Validation data"), el("dd", {}, up(draft.uploads.val)),
        el("dt", {}, "Hyperparameters"), el("dd", {}, hp.length
          ? el("ul", { class: "plain" }, hp.map(([k, v]) => el("li", {}, el("code", {}, k), " = ", String(v))))
          : "all defaults"));
    },
  };
}

/** Where a server-named field lives: [step, input id or null]. */
function fieldTarget(fieldName) {
  let m;
  if ((m = /^hyperparameters\.(\w+)$/.exec(fieldName || ""))) return [4, inputId(m[1])];
  if ((m = /^(train|val)_upload$/.exec(fieldName || ""))) return [3, `upload-${m[1]}`];
  if (fieldName === "model.path") return [1, "model-path-input"];
  if (fieldName?.startsWith("model")) return [1, null];
  if (fieldName === "algorithm") return [2, "algorithm"];
  if (fieldName === "task.path") return [2, "task-path"];
  if (fieldName?.startsWith("task")) return [2, "task"];
  if (fieldName === "name") return [5, "job-name"];
  return [5, null];
}

/** Mount the wizard into `root`; returns {dispose}. */
export async function wizardView(root) {
  const options = await getOptions();
  const ctx = { options, draft };
  const steps = [modelStep(ctx), taskStep(ctx), uploadStep(ctx), hyperStep(ctx), reviewStep(ctx)];
  const strip = el("div", {});
  const submit = el("button", { type: "button", id: "submit", class: "primary" }, "Submit job");
  const panels = steps.map((s, i) => {
    const n = i + 1;
    const back = n > 1 ? el("button", { type: "button", id: `back-${n}`, class: "secondary", onclick: () => go(n - 1) },
      "Back") : null;
    const onclick = () => {
      if (!s.validate || s.validate()) go(n + 1);
      else panels[n - 1].querySelector(".invalid")?.focus();
    };
    const next = n < 5 ? el("button", { type: "button", id: `next-${n}`, class: "primary", onclick }, "Next") : submit;
    return stepPanel(n, s.node, [back, next]);
  });

  function go(n) {
    draft.step = n;
    draft.reached = Math.max(draft.reached, n);
    replace(strip, stepper(n, go, draft.reached));
    panels.forEach((p, i) => { p.hidden = i + 1 !== n; });
    steps[n - 1].show?.();
    window.scrollTo(0, 0);
  }

  submit.addEventListener("click", async () => {
    for (const box of root.querySelectorAll(".error-box")) box.replaceChildren(); // the last try's messages
    submit.disabled = true;
    try {
      const job = await api("POST", "/api/jobs", { json: jobRequest(options) });
      draft = freshDraft();
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      const [step, id] = fieldTarget(err.field);
      go(step);
      const input = id && document.getElementById(id);
      setFieldError(input || null, err.message, step === 5 ? "submit-error" : `step-${step}-error`);
      input?.focus();
    } finally {
      submit.disabled = false;
    }
  });

  replace(root, el("h1", {}, "New training job"), strip, panels);
  go(Math.min(draft.step, 5));
  return { dispose() {} };
}
