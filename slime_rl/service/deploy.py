"""Deployments: a succeeded job's model served by `slime-rl serve` (OpenAI-compatible, on a loopback port the
OS picks, with an API key of its own), and the chat box's messages relayed to it.

A deployment is `starting` until its server prints its "listening on" line, then `ready`; `failed` (with the
server's own last words) when it exits or does not come up in time; `stopped` after DELETE or when the
service finds it gone at start.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from slime_rl.service import procs
from slime_rl.service.forms import RequestError
from slime_rl.service.store import Store

READY_TIMEOUT_S = 300.0
LISTENING = re.compile(r"listening on (http://[\d.]+:(\d+))")
MAX_MESSAGES = 64
MAX_CONTENT = 16384
ROLES = ("system", "user", "assistant")


class Deployments:
    def __init__(self, store: Store, root: Path):
        self.store, self.root = store, root
        for dep in store.deployments():  # the servers of an earlier service: kept where still there
            if dep["status"] in ("starting", "ready") and not procs.alive(dep["pid"], dep["pid_start"]):
                store.update_deployment(dep["id"], status="stopped", error="gone when the service restarted")

    def deploy(self, job: dict, model_dir: Path) -> dict:
        for dep in self.store.deployments(job["id"]):
            if dep["status"] in ("starting", "ready"):
                return dep
        dep_id = "d_" + secrets.token_hex(6)
        dep_dir = self.root / "deployments" / dep_id
        dep_dir.mkdir(parents=True)
        key = secrets.token_urlsafe(16)
        (dep_dir / "api_key").write_text(key)
        name = job["name"] or job["id"]
        argv = procs.slime_rl_argv("serve", "--model", str(model_dir), "--port", "0", f"--api-key={key}",
                                   "--served-model-name", name, "--num-threads", "1")
        child = procs.spawn(argv, dep_dir / "log.txt", cwd=self.root)
        self.store.add_deployment({"id": dep_id, "job_id": job["id"], "status": "starting", "pid": child.pid,
                                   "pid_start": procs.start_time(child.pid), "model": name})
        threading.Thread(target=self._wait_ready, args=(dep_id, child, dep_dir), daemon=True).start()
        return self.store.deployment(dep_id)

    def _wait_ready(self, dep_id: str, child, dep_dir: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in procs.tail(dep_dir / "log.txt", 50):
                if m := LISTENING.search(line):
                    self.store.update_deployment(dep_id, only_if=("starting",), status="ready",
                                                 url=m.group(1) + "/v1", port=int(m.group(2)))
                    threading.Thread(target=child.wait, daemon=True).start()  # reaped when it ends
                    return
            if child.poll() is not None:
                last = procs.tail(dep_dir / "log.txt", 1)
                self.store.update_deployment(dep_id, only_if=("starting",), status="failed",
                                             error=f"the server exited ({child.returncode})"
                                                   + (f": {last[0]}" if last else ""))
                return
            time.sleep(0.2)
        procs.stop(child.pid, procs.start_time(child.pid), grace_s=2)
        self.store.update_deployment(dep_id, only_if=("starting",), status="failed",
                                     error=f"the server did not come up in {READY_TIMEOUT_S:.0f} s")

    def stop(self, dep_id: str) -> dict | None:
        dep = self.store.deployment(dep_id)
        if dep is None:
            return None
        if dep["status"] in ("starting", "ready"):
            self.store.update_deployment(dep_id, status="stopped")
            procs.stop(dep["pid"], dep["pid_start"], grace_s=5)
        return self.store.deployment(dep_id)

    def api_key(self, dep_id: str) -> str:
        return (self.root / "deployments" / dep_id / "api_key").read_text()

    async def chat(self, dep: dict, body: Any, session: aiohttp.ClientSession) -> dict:
        """Relay a chat request to the deployment's server; its answer's first choice is the reply."""
        if dep["status"] != "ready":
            raise RequestError("deployment", f"deployment {dep['id']} is {dep['status']}, not ready", status=409)
        messages, max_tokens = check_chat(body)
        request = {"model": dep["model"], "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        headers = {"Authorization": f"Bearer {self.api_key(dep['id'])}"}
        try:
            async with session.post(dep["url"] + "/chat/completions", json=request, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=120)) as resp:
                answer = await resp.json(content_type=None)
                if resp.status != 200:
                    message = answer.get("error", {}).get("message") if isinstance(answer, dict) else None
                    raise RequestError("messages", f"the model server answered {resp.status}: {message}", status=502)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise RequestError("deployment", f"the model server did not answer: {type(exc).__name__}: {exc}",
                               status=502) from None
        return {"reply": answer["choices"][0]["message"]["content"], "usage": answer.get("usage")}


def check_chat(body: Any) -> tuple[list[dict], int]:
    if not isinstance(body, dict):
        raise RequestError("body", "body: expected a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise RequestError("messages", f"messages: expected a list of 1 to {MAX_MESSAGES} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role", f"messages[{i}].role: expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) or len(m["content"]) > MAX_CONTENT:
            raise RequestError(f"messages[{i}].content",
                               f"messages[{i}].content: expected a string of at most {MAX_CONTENT} characters")
        out.append({"role": m["role"], "content": m["content"]})
    max_tokens = body.get("max_tokens", 64)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 2048:
        raise RequestError("max_tokens", "max_tokens: expected an integer in [1, 2048]")
    return out, max_tokens
