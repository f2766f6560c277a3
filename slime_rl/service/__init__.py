"""`slime-rl service`: RFT as a service. A job server (SQLite-backed queue, each job its own `slime-rl train`
process, jobs that survive a restart, cancel, resume, deploy) with a REST API (`app.py`, `openapi.py`) and a
web UI (`static/`) that walks the seven steps: model, algorithm and task, data, hyperparameters, submit,
monitor, deploy."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServiceConfigError(ValueError):
    """A `slime-rl service` flag that cannot work; the message starts with the flag."""


@dataclass
class ServiceConfig:
    """Settings of `slime-rl service` (one flag each)."""

    host: str = "127.0.0.1"  # address to listen on; beyond loopback the token is required
    port: int = 8700  # 0 = any free port (the printed line says which)
    root: str = "runs/service"  # the database, uploads, jobs' folders and deployments live here
    token: str | None = None  # /api routes (but /api/health) need "Authorization: Bearer TOKEN"; unset: random, printed
    max_concurrent_jobs: int = 1  # jobs running at once; the others wait in the queue
    allow_unauthenticated: bool = False  # no token at all (loopback only)

    def validate(self) -> "ServiceConfig":
        if not 0 <= self.port <= 65535:
            raise ServiceConfigError(f"--port {self.port}: expected 0..65535")
        if self.max_concurrent_jobs < 1:
            raise ServiceConfigError(f"--max-concurrent-jobs {self.max_concurrent_jobs}: expected >= 1")
        if self.token is not None and len(self.token) < 8:
            raise ServiceConfigError("--token: at least 8 characters")
        if self.allow_unauthenticated and self.host not in LOOPBACK:
            raise ServiceConfigError(f"--allow-unauthenticated: only on a loopback --host, not {self.host}")
        return self


def serve_service(cfg: ServiceConfig) -> int:
    """Run the service until SIGINT/SIGTERM; running jobs go on and are reattached by the next start."""
    from rollout.http_conn import guarded_runner, serve_until_signal
    from slime_rl.service.app import Service, create_app

    cfg.validate()
    token = None if cfg.allow_unauthenticated else (cfg.token or secrets.token_urlsafe(18))
    service = Service(Path(cfg.root), token, cfg.max_concurrent_jobs)
    runner = guarded_runner(create_app(service), header_timeout_s=30.0)
    if token and not cfg.token:
        print(f"service: token {token} (open the URL below with #token={token})", flush=True)
    banner = f"root {service.root}, up to {cfg.max_concurrent_jobs} job(s) at once"
    return asyncio.run(serve_until_signal(runner, cfg.host, cfg.port, "service", banner, ServiceConfigError))
