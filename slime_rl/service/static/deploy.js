// Step 7 on the job page: deploy a succeeded job's model, show its OpenAI-compatible URL, chat with it, stop it.
//
// A deployment starts as "starting" and is polled until "ready" or "failed"; the chat box keeps the
// conversation in the page and sends all of it with each message (the server holds no chat state).

import { api } from "./api.js";
import { el, replace, every } from "./dom.js";
import { stepPanel } from "./wizard.js";

const POLL_MS = 1000;
const LIVE = new Set(["starting", "ready"]);

export function deploySection(jobId) {
  let dep = null;
  let jobStatus = null;
  let poller = null;
  let history = [];
  let problem = null; // the last Deploy/Stop call's error, shown until the next call

  const deployBtn = el("button", { type: "button", id: "deploy", class: "primary", disabled: true }, "Deploy");
  const stopBtn = el("button", { type: "button", id: "deploy-stop", class: "danger", hidden: true }, "Stop");
  const hint = el("p", { class: "help", id: "deploy-hint" });
  const state = el("div", { class: "deploy-state" });
  const chatLog = el("div", { id: "chat-log", class: "chat-log", "aria-live": "polite" });
  const chatInput = el("textarea", { id: "chat-input", rows: 2, placeholder: "Ask the model… (Enter sends)" });
  const chatSend = el("button", { type: "button", id: "chat-send", class: "primary" }, "Send");
  const chat = el("div", { class: "chat", id: "chat", hidden: true },
    chatLog, el("div", { class: "chat-compose" }, chatInput, chatSend));

  function render() {
    const live = dep && LIVE.has(dep.status);
    deployBtn.disabled = jobStatus !== "succeeded" || Boolean(live);
    replace(hint, jobStatus === "succeeded" ? (live ? "" : "Serve this job's final weights behind an "
      + "OpenAI-compatible API.") : "Deploying is possible once the job has succeeded.");
    stopBtn.hidden = !live;
    chat.hidden = dep?.status !== "ready";
    const error = problem || dep?.error;
    replace(state,
      dep ? el("div", {}, "Deployment ", el("code", {}, dep.id), ": ",
        el("span", { id: "deploy-status", class: `badge status-${dep.status}` }, dep.status)) : null,
      dep?.url ? el("div", { class: "deploy-url" }, "OpenAI-compatible URL: ",
        el("code", { id: "deploy-url" }, dep.url)) : null,
      dep?.url && dep?.api_key ? el("div", { class: "deploy-url" }, "API key (Authorization: Bearer): ",
        el("code", { id: "deploy-key" }, dep.api_key)) : null,
      error ? el("div", { class: "error-box", id: "deploy-error" }, error) : null);
  }

  function follow(d) {
    dep = d;
    render();
    poller?.stop();
    if (dep.status !== "starting") return;
    poller = every(POLL_MS, async () => {
      dep = await api("GET", `/api/deployments/${encodeURIComponent(dep.id)}`);
      render();
      return dep.status === "starting";
    });
  }

  async function act(button, fn) {
    button.disabled = true;
    problem = null;
    try {
      await fn();
    } catch (err) {
      problem = err.message;
    } finally {
      render();
    }
  }

  deployBtn.addEventListener("click", () => act(deployBtn, async () => {
    history = [];
    chatLog.replaceChildren();
    follow(await api("POST", `/api/jobs/${encodeURIComponent(jobId)}/deploy`));
  }));
  stopBtn.addEventListener("click", () => act(stopBtn, async () => {
    follow(await api("DELETE", `/api/deployments/${encodeURIComponent(dep.id)}`));
  }));

  /** Append a message; `data-length` is its length as sent or received (a reply may be only whitespace). */
  function say(role, text, { cls = "", shown = text } = {}) {
    const node = el("div", { class: `msg msg-${role} ${cls}`.trim(), dataset: { role, length: text.length } },
      el("span", { class: "msg-role" }, role === "user" ? "you" : role), el("div", { class: "msg-text" }, shown));
    chatLog.append(node);
    chatLog.scrollTop = chatLog.scrollHeight;
  }

  async function send() {
    const text = chatInput.value.trim();
    if (!text || chatSend.disabled) return;
    const message = { role: "user", content: text };
    say("user", text);
    chatInput.value = "";
    chatSend.disabled = true;
    try {
      const answer = await api("POST", `/api/deployments/${encodeURIComponent(dep.id)}/chat`,
        { json: { messages: [...history, message], max_tokens: 64 } });
      const reply = String(answer.reply ?? "");
      history.push(message, { role: "assistant", content: reply });
      // An untrained model may answer with nothing or only spaces: say so rather than show a blank bubble.
      const blank = reply ? `(only whitespace: ${reply.length} characters)` : "(empty reply)";
      say("assistant", reply, reply.trim() ? {} : { cls: "empty", shown: blank });
    } catch (err) {
      say("error", err.message);
    } finally {
      chatSend.disabled = false;
      chatInput.focus();
    }
  }
  chatSend.addEventListener("click", send);
  chatInput.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      send();
    }
  });

  render();
  return {
    node: stepPanel(7, el("div", {}, hint, el("div", { class: "row" }, deployBtn, stopBtn), state, chat)),
    /** Called on each job refresh: enables Deploy on success and adopts a deployment made elsewhere. */
    update(job) {
      jobStatus = job.status;
      if (!dep && job.deployment && LIVE.has(job.deployment.status)) follow(job.deployment);
      else render();
    },
    dispose() {
      poller?.stop();
    },
  };
}
