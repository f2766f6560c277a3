"""Routing across engine servers: the real sglang-router, or the built-in fallback.

`SGLangRouter` launches `python -m sglang_router.launch_router` (the Rust "SGL
Model Gateway", sglang-router 0.3.2) in its own process group and drives its
HTTP control API: `GET /readiness`, `GET/POST /workers`, `DELETE /workers/{id}`.
`start_router(...)` returns a started router: the real one when it imports and
starts, else (with a WARNING naming the reason) `rollout.builtin_router.BuiltinRouter`.
Both satisfy the `Router` protocol below.

What the real router does and does not do (see the SGLang HTTP reference, §7):
it routes `POST /generate`, `/v1/completions` and `/v1/chat/completions` to one
worker (cache_aware: by the longest cached prefix of the request's routing text,
which is `text`, or `input_ids` rendered as decimal numbers joined by spaces);
it retries 5xx answers and connection errors, and fans `POST /flush_cache` out.
It does NOT route control calls (abort, pause, weight updates, ...): send those
to each worker directly (`[w["url"] for w in router.workers()]`).

Its health-check defaults are slow (one probe per 60 s, 3 failures to eject);
`FAST_FAILURE_FLAGS` below eject a dead worker within ~2 probe intervals, and
let a worker whose circuit breaker opened be tried again after 10 s instead of
60 s. Any launch flag can be overridden (or dropped, with None) through
`extra_args`, e.g. `{"health-failure-threshold": 1, "cache-threshold": 0.5}`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from rollout.builtin_router import BuiltinRouter
from slime_rl.dist_group import free_port

logger = logging.getLogger(__name__)

SGLANG_ROUTER_MODULE = "sglang_router.launch_router"
SGLANG_POLICIES = ("random", "round_robin", "cache_aware", "power_of_two", "manual")
PREFER_CHOICES = ("sglang-router", "builtin")

# Defaults passed to the real router on top of host/port/policy/workers; `extra_args` wins.
FAST_FAILURE_FLAGS: dict[str, Any] = {
    "health-check-timeout-secs": 2,
    "health-failure-threshold": 2,
    "health-success-threshold": 1,
    "worker-startup-check-interval": 1,
    "cb-timeout-duration-secs": 10,
    "shutdown-grace-period-secs": 2,
    "log-level": "warn",
}
# Router settings by workload: `policy` + sglang-router flags (benchmarks/bench_routing_rl.py measures them).
# "rl": session affinity on the X-SMG-Routing-Key that EngineClient sends per group / conversation, new keys
# on the least-loaded worker. cache_aware with its default thresholds sends every conversation that
# starts with a shared system prompt to one worker (the prompt always matches more than 30 % and the
# balance threshold, 64 requests in flight, is never reached); "cache_aware_rl" balances early instead.
ROUTER_SETTINGS: dict[str, dict[str, Any]] = {
    "rl": {"policy": "manual", "flags": {"assignment-mode": "min_load"}},
    "cache_aware_rl": {"policy": "cache_aware",
                       "flags": {"balance-abs-threshold": 2, "balance-rel-threshold": 1.1}},
}
_POLL_S = 0.1  # how often start()/add_worker()/remove_worker() re-read the router's state


class RouterError(RuntimeError):
    """The router could not be started, or a control call failed (the message names the URL)."""


class Router(Protocol):
    """What callers may rely on, whichever router `start_router` returned."""

    url: str

    def add_worker(self, url: str, timeout_s: float = 60.0) -> None: ...
    def remove_worker(self, url: str, timeout_s: float = 30.0) -> None: ...
    def workers(self) -> list[dict[str, Any]]: ...
    def flush_cache(self) -> dict[str, Any]: ...
    def stop(self) -> None: ...
    def __enter__(self) -> "Router": ...
    def __exit__(self, *exc: object) -> None: ...


def http_json(method: str, url: str, body: Any = None, timeout_s: float = 10.0) -> tuple[int, Any]:
    """One HTTP call; returns (status, parsed JSON or raw text). Raises OSError when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _flag_args(flags: dict[str, Any]) -> list[str]:
    """{"policy": "x", "dp-aware": True, "worker-urls": [a, b], "drop-me": None} -> argv."""
    argv: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append("--" + name.lstrip("-"))
        if value is True:
            continue
        if isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        else:
            argv.append(str(value))
    return argv


class SGLangRouter:
    """sglang-router 0.3.2 as a managed subprocess.

    `min_healthy_workers` (default: all of `worker_urls`) is how many workers
    `start()` waits to see healthy in `GET /readiness`. The router's output goes
    to `log_path` (default: a temporary file, removed by `stop()`); its tail is
    quoted in start errors.
    """

    def __init__(self, worker_urls: list[str], *, policy: str = "cache_aware", host: str = "127.0.0.1",
                 port: int = 0, extra_args: dict[str, Any] | None = None, log_path: str | Path | None = None,
                 health_check_interval_s: float = 2.0, min_healthy_workers: int | None = None):
        if policy not in SGLANG_POLICIES:
            raise ValueError(f"policy must be one of {SGLANG_POLICIES} for sglang-router, got {policy!r}")
        self.worker_urls = [u.rstrip("/") for u in worker_urls]
        self.policy, self.host = policy, host
        self.port = port or free_port(host)
        self.prometheus_port = free_port("127.0.0.1")  # the router always opens one; keep it off 0.0.0.0:29000
        self.url = f"http://{host}:{self.port}"
        self.extra_args = {k.lstrip("-"): v for k, v in (extra_args or {}).items()}
        self.health_check_interval_s = health_check_interval_s
        self.min_healthy_workers = len(self.worker_urls) if min_healthy_workers is None else min_healthy_workers
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="sglang_router_", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        flags: dict[str, Any] = {
            "host": self.host, "port": self.port, "policy": self.policy,
            "worker-urls": self.worker_urls or None,
            "prometheus-host": "127.0.0.1", "prometheus-port": self.prometheus_port,
            "health-check-interval-secs": max(1, round(self.health_check_interval_s)),  # the flag is whole seconds
            **FAST_FAILURE_FLAGS,
        }
        flags.update(self.extra_args)
        return [sys.executable, "-m", SGLANG_ROUTER_MODULE, *_flag_args(flags)]

    def start(self, timeout_s: float = 60.0) -> "SGLangRouter":
        """Launch and wait until `min_healthy_workers` workers are healthy; RouterError otherwise."""
        if self._proc is not None:
            raise RouterError(f"router {self.url} already started")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # it may try to fetch a tokenizer for non-local model paths
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        last: Any = "no answer"
        while True:
            if self._proc.poll() is not None:
                self._fail(f"exited with code {self._proc.returncode} before becoming ready")
            try:
                _, last = http_json("GET", self.url + "/readiness", timeout_s=2)
                healthy = last.get("healthy_workers", 0) if isinstance(last, dict) else 0
                if healthy >= self.min_healthy_workers:
                    return self
            except OSError as e:
                last = f"no answer ({e})"
            if time.monotonic() > deadline:
                self._fail(f"not ready after {timeout_s:.0f} s (wanted {self.min_healthy_workers} healthy "
                           f"of {self.worker_urls}); last /readiness: {last}")
            time.sleep(_POLL_S)

    def _fail(self, why: str) -> None:
        tail = self.log_tail()
        self.stop()
        raise RouterError(f"sglang-router at {self.url} {why}\ncommand: {' '.join(self.command())}\nlog tail:\n{tail}")

    def log_tail(self, n_bytes: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n_bytes:].decode(errors="replace")
        except OSError:
            return ""

    def workers(self) -> list[dict[str, Any]]:
        """The router's `GET /workers` list: dicts with id, url, is_healthy, load, model_id, ..."""
        status, body = http_json("GET", self.url + "/workers")
        if status != 200 or not isinstance(body, dict):
            raise RouterError(f"GET {self.url}/workers answered {status}: {body}")
        return body["workers"]

    def _find(self, url: str) -> dict[str, Any] | None:
        return next((w for w in self.workers() if w["url"].rstrip("/") == url), None)

    def add_worker(self, url: str, timeout_s: float = 60.0) -> None:
        """Register a worker (POST /workers) and wait until the router lists it healthy."""
        url = url.rstrip("/")
        status, body = http_json("POST", self.url + "/workers", {"url": url})
        if status not in (200, 202):
            raise RouterError(f"router {self.url} refused to add worker {url}: {status} {body}")
        _wait_until(lambda: (w := self._find(url)) is not None and w["is_healthy"], timeout_s,
                    f"worker {url} not healthy in router {self.url} after {timeout_s} s "
                    f"(is it up? GET {url}/health must answer 200)")

    def remove_worker(self, url: str, timeout_s: float = 30.0) -> None:
        """Deregister a worker (DELETE /workers/{id}) and wait until it is gone from the list."""
        url = url.rstrip("/")
        worker = self._find(url)
        if worker is None:
            known = [w["url"] for w in self.workers()]
            raise ValueError(f"worker {url} is not registered with router {self.url}; registered: {known}")
        status, body = http_json("DELETE", f"{self.url}/workers/{worker['id']}")
        if status not in (200, 202):
            raise RouterError(f"router {self.url} refused to remove worker {url}: {status} {body}")
        _wait_until(lambda: self._find(url) is None, timeout_s,
                    f"worker {url} still listed by router {self.url} after {timeout_s} s")

    def flush_cache(self) -> dict[str, Any]:
        """Router fan-out of POST /flush_cache; the answer says which workers flushed."""
        return http_json("POST", self.url + "/flush_cache", timeout_s=60)[1]

    def stop(self) -> None:
        """SIGTERM the router's process group, SIGKILL after 5 s; remove the temporary log."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "SGLangRouter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session=True: the group id is the router's pid
    except ProcessLookupError:
        pass


def _wait_until(condition, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RouterError(message)
        time.sleep(_POLL_S)


def sglang_router_missing() -> str | None:
    """Why the real router cannot be launched from this interpreter, or None if it can."""
    try:
        spec = importlib.util.find_spec(SGLANG_ROUTER_MODULE)
    except (ImportError, ValueError) as e:
        return f"cannot import {SGLANG_ROUTER_MODULE}: {e}"
    return None if spec is not None else f"module {SGLANG_ROUTER_MODULE} not found (pip install sglang-router)"


# extra_args the built-in router understands (the same meaning as the sglang-router flags)
_BUILTIN_FLAGS = {"cache-threshold": "cache_threshold", "balance-abs-threshold": "balance_abs_threshold",
                  "balance-rel-threshold": "balance_rel_threshold", "health-failure-threshold":
                  "health_failure_threshold", "health-success-threshold": "health_success_threshold"}


def start_router(worker_urls: list[str], policy: str = "cache_aware", prefer: str = "sglang-router", *,
                 host: str = "127.0.0.1", port: int = 0, health_check_interval_s: float = 2.0,
                 min_healthy_workers: int | None = None, start_timeout_s: float = 60.0,
                 extra_args: dict[str, Any] | None = None, log_path: str | Path | None = None) -> Router:
    """A started router over `worker_urls`: sglang-router if it imports and starts, else the built-in one.

    `extra_args` are sglang-router flags; the built-in router honours the
    cache/balance/health thresholds among them and ignores the rest.
    """
    if prefer not in PREFER_CHOICES:
        raise ValueError(f"prefer must be one of {PREFER_CHOICES}, got {prefer!r}")
    common = dict(policy=policy, host=host, port=port, health_check_interval_s=health_check_interval_s,
                  min_healthy_workers=min_healthy_workers)
    if prefer == "sglang-router":
        reason = sglang_router_missing()
        if reason is None:
            try:
                return SGLangRouter(worker_urls, extra_args=extra_args, log_path=log_path, **common).start(
                    timeout_s=start_timeout_s)
            except (RouterError, OSError) as e:
                reason = f"it failed to start: {e}"
        logger.warning("sglang-router not used, falling back to the built-in router: %s", reason)
    builtin_kw = {_BUILTIN_FLAGS[k.lstrip("-")]: v for k, v in (extra_args or {}).items()
                  if k.lstrip("-") in _BUILTIN_FLAGS}
    return BuiltinRouter(worker_urls, **common, **builtin_kw).start(timeout_s=start_timeout_s)
