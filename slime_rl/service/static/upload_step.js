// Wizard step 3: training and validation JSONL files.
//
// A file is POSTed raw to /api/uploads as soon as it is chosen; the server parses it for the chosen task and
// answers with its row count, or a 400 naming the file and line of the first bad row, shown in red beside the
// input. An upload is checked against one task, so changing the task in step 2 drops it (see wizard.js).

import { api } from "./api.js";
import { el, replace, fmtNumber } from "./dom.js";
import { clearFieldError, errorBox, setFieldError } from "./fields.js";

const KINDS = [
  { kind: "train", label: "Training prompts (JSONL)" },
  { kind: "val", label: "Validation prompts (JSONL)" },
];

export function uploadStep({ options, draft }) {
  const pending = new Set(); // kinds still uploading: Next waits for them
  const rows = KINDS.map(({ kind, label }) => uploadRow(kind, label, draft, pending));
  const note = el("p", { class: "help", id: "upload-note" });
  const node = el("div", {},
    note,
    el("p", { class: "help" }, "One JSON object per line, e.g. ",
      el("code", {}, '{"prompt": "12+30=", "label": "42"}'),
      ". Without files a generating task makes its own data."),
    rows.map((r) => r.node),
    errorBox("step-3-error"));

  return {
    node,
    show() {
      const task = options.tasks.find((t) => t.id === draft.task);
      const required = task?.data === "required";
      replace(note, required
        ? `Task "${task.label}" trains on your file: a training file is required.`
        : `Task "${task?.label ?? draft.task}" can generate its own data: files are optional.`);
      for (const r of rows) r.refresh();
    },
    validate() {
      if (pending.size) {
        setFieldError(null, "Wait for the upload to finish.", "step-3-error");
        return false;
      }
      const task = options.tasks.find((t) => t.id === draft.task);
      if (task?.data === "required" && !draft.uploads.train) {
        setFieldError(document.getElementById("upload-train"), "This task needs a training file.");
        return false;
      }
      return true;
    },
  };
}

function uploadRow(kind, label, draft, pending) {
  const id = `upload-${kind}`;
  const status = el("div", { class: "upload-status", id: `${id}-status` });
  const input = el("input", { type: "file", id, accept: ".jsonl,.json,.txt" });
  const remove = el("button", { type: "button", class: "link", id: `${id}-remove`, hidden: true }, "remove");

  const refresh = () => {
    const up = draft.uploads[kind];
    remove.hidden = !up;
    if (!up && !pending.has(kind)) input.value = ""; // dropped (e.g. the task changed): show no file
    if (up) {
      status.className = "upload-status ok";
      replace(status, `✓ ${up.filename}: ${fmtNumber(up.rows)} rows`);
    } else if (!status.classList.contains("bad")) {
      status.className = "upload-status";
      replace(status, "no file chosen");
    }
  };

  input.addEventListener("change", async () => {
    const file = input.files[0];
    clearFieldError(input);
    draft.uploads[kind] = null;
    if (!file) return refresh();
    pending.add(kind);
    status.className = "upload-status busy";
    replace(status, `uploading ${file.name} …`);
    try {
      const up = await api("POST", "/api/uploads",
        { body: file, params: { kind, task: draft.task, filename: file.name } });
      draft.uploads[kind] = { id: up.id, filename: up.filename, rows: up.rows, task: draft.task };
    } catch (err) {
      input.value = ""; // so choosing the fixed file again fires `change`
      status.className = "upload-status bad";
      replace(status, err.message);
      input.classList.add("invalid");
    } finally {
      pending.delete(kind);
      refresh();
    }
  });
  remove.addEventListener("click", () => {
    draft.uploads[kind] = null;
    input.value = "";
    status.classList.remove("bad");
    refresh();
  });

  const node = el("div", { class: "field upload" },
    el("label", { for: id }, label),
    el("div", { class: "upload-row" }, input, remove),
    status,
    el("div", { class: "field-error", id: `${id}-error`, role: "alert" }));
  return { node, refresh };
}
