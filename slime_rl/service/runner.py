"""Runs the service's jobs: a queue with a limit on concurrent jobs, each job its own `slime-rl train`
process (the existing launchers start its engines and trainer ranks), watched from one thread.

A job ends `succeeded` when its process exits 0, `failed` otherwise, with the reason taken from its log: the
command's one-line error (`slime-rl train: data error: train.jsonl:3: ...`) or the traceback's last line.
After a service restart, a job recorded as running is reattached when its process is still there (same pid
and start time); when it is gone, its exit status is read from the file its shell wrote; when there is
none, it is failed with the reason, and `resume` starts it again from its newest checkpoint.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from slime_rl.checkpoint import list_checkpoints
from slime_rl.service import procs, views
from slime_rl.service.store import ENDED, Store

POLL_S = 0.5


class JobRunner:
    def __init__(self, store: Store, root: Path, max_concurrent: int = 1):
        self.store, self.root, self.max_concurrent = store, root, max_concurrent
        self._children: dict[str, Any] = {}  # job id -> Popen of the processes this service started (watcher only)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="job-runner", daemon=True)

    def start(self) -> None:
        self._reattach()
        self._thread.start()

    def close(self) -> None:
        """Stop watching; running jobs go on in their own sessions and are reattached by the next service."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def submit(self, name: str, request: dict, config: dict, job_id: str | None = None) -> str:
        job_id = job_id or self.new_id()
        job_dir = self.job_dir(job_id)
        job_dir.mkdir(parents=True)
        self.store.add_job(job_id, name or job_id, request, config, str(job_dir))
        self._wake.set()
        return job_id

    def new_id(self) -> str:
        return "j_" + secrets.token_hex(6)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job (its whole process group); False when it had already ended."""
        job = self.store.job(job_id)
        if job is None or job["status"] in ENDED:
            return False
        if not self.store.update_job(job_id, only_if=("queued", "running"), status="cancelled",
                                     ended_at=time.time(), error="cancelled by the user"):
            return False
        threading.Thread(target=procs.stop, args=(job["pid"], job["pid_start"]), daemon=True).start()
        self._wake.set()
        return True

    def resume(self, job_id: str) -> bool:
        """Queue a failed or cancelled job again; it resumes from its newest checkpoint when it has one."""
        job = self.store.job(job_id)
        if job is None or job["status"] not in ("failed", "cancelled"):
            return False
        config = dict(job["config"])
        if list_checkpoints(views.out_dir(job)):
            config["ckpt"] = {**config.get("ckpt", {}), "resume": "auto"}
        if not self.store.update_job(job_id, only_if=("failed", "cancelled"), status="queued", config=config,
                                     error=None, ended_at=None, returncode=None, pid=None, pid_start=None):
            return False
        self._wake.set()
        return True

    # the watcher
    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                self._launch()
            except Exception as exc:  # never let one bad row stop the watcher
                print(f"service: job runner: {type(exc).__name__}: {exc}", flush=True)
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _launch(self) -> None:
        running = len(self.store.jobs("running"))
        for job in reversed(self.store.jobs("queued")):  # oldest first
            if running >= self.max_concurrent:
                return
            self._start(job)
            running += 1

    def _start(self, job: dict) -> None:
        job_dir = Path(job["job_dir"])
        config_path = job_dir / "config.json"
        config_path.write_text(json.dumps(job["config"], indent=1))
        exit_file = job_dir / procs.EXIT_FILE
        exit_file.unlink(missing_ok=True)
        with open(job_dir / "log.txt", "ab") as log:
            log.write(f"--- service: attempt {job['attempts'] + 1} at {time.ctime()}\n".encode())
        child = procs.spawn(procs.slime_rl_argv("train", "-c", str(config_path)), job_dir / "log.txt",
                            cwd=self.root, exit_file=exit_file)
        started = procs.start_time(child.pid)
        if not self.store.update_job(job["id"], only_if=("queued",), status="running", started_at=time.time(),
                                     pid=child.pid, pid_start=started, attempts=job["attempts"] + 1):
            procs.stop(child.pid, started, grace_s=2)  # cancelled meanwhile
            return
        self._children[job["id"]] = child

    def _reap(self) -> None:
        for job in self.store.jobs("running"):
            child = self._children.get(job["id"])
            if child is not None:
                child.poll()  # reap our own child, so that it is not a zombie that looks alive
            if procs.alive(job["pid"], job["pid_start"]):
                continue
            self._children.pop(job["id"], None)
            self._finish(job)
        for job_id, child in list(self._children.items()):  # cancelled jobs' children
            if child.poll() is not None:
                self._children.pop(job_id, None)

    def _finish(self, job: dict) -> None:
        job_dir = Path(job["job_dir"])
        code = procs.read_exit_code(job_dir / procs.EXIT_FILE)
        if code == 0:
            values = {"status": "succeeded", "returncode": 0, "error": None}
        elif code is None:
            values = {"status": "failed", "error": "the job's process ended without an exit status (killed, or "
                      "the machine restarted); resume it to continue from its newest checkpoint"}
        else:
            values = {"status": "failed", "returncode": code, "error": failure_reason(job_dir / "log.txt", code)}
        self.store.update_job(job["id"], only_if=("running",), ended_at=time.time(), **values)

    def _reattach(self) -> None:
        """At start: jobs recorded as running whose process is still there are watched again (the watcher
        does it by pid); those whose process is gone end now, from their exit file."""
        for job in self.store.jobs("running"):
            if not procs.alive(job["pid"], job["pid_start"]):
                self._finish(job)


def failure_reason(log_path: Path, code: int) -> str:
    """The job's own account of why it failed: the CLI's one-line error, else the last line of a traceback,
    else the last line of its log."""
    lines = procs.tail(log_path, 200)
    for line in reversed(lines):
        if line.startswith("slime-rl "):
            return line
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    return f"exit status {code}" + (f": {lines[-1]}" if lines else "")
