"""The job service's HTTP API (aiohttp) and the web UI's files. The UI is only a client of this API; every
route is in `openapi.py`'s document, served at /api/openapi.json.

Every request body and parameter is checked before use: a bad one is a 4xx whose JSON names the field
(`{"error": "hyperparameters.epochs: ...", "field": "hyperparameters.epochs"}`), never a 500. With a token
(always, unless the service runs with --allow-unauthenticated on loopback), every /api route but /api/health
needs `Authorization: Bearer TOKEN`; the UI's own files are public and ask for the token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from slime_rl.service import forms, openapi, procs, uploads, views
from slime_rl.service.deploy import Deployments
from slime_rl.service.forms import RequestError
from slime_rl.service.runner import JobRunner
from slime_rl.service.store import STATUSES, Store

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
SERVICE = web.AppKey("service", object)
MAX_BODY = uploads.MAX_BYTES + (1 << 20)


class Service:
    """The state behind the routes: the store, the job runner and the deployments, under one root folder."""

    def __init__(self, root: Path, token: str | None, max_concurrent: int = 1):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.store = Store(self.root / "service.db")
        self.runner = JobRunner(self.store, self.root, max_concurrent)
        self.deployments = Deployments(self.store, self.root)
        self.session: aiohttp.ClientSession | None = None

    def job_or_404(self, job_id: str) -> dict:
        job = self.store.job(job_id)
        if job is None:
            raise RequestError("id", f"id: no job {job_id[:40]!r}", status=404)
        return job

    def view(self, job: dict, detail: bool = True) -> dict:
        deps = self.store.deployments(job["id"]) if detail else []
        return views.job_view(job, deps[0] if deps else None, detail)


def error(message: str, status: int, field: str | None = None, **extra: Any) -> web.Response:
    return web.json_response({"error": message, "field": field, **extra}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except RequestError as exc:
        return error(str(exc), exc.status, exc.field, **exc.extra)
    except web.HTTPRequestEntityTooLarge:
        return error(f"body: larger than {MAX_BODY} bytes", 413, "body")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return error(f"{request.method} {request.path}: {exc.reason}", exc.status, "path")
        raise
    except Exception:  # noqa: BLE001 - no request may take the service down or see a traceback
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error(f"internal error in {request.method} {request.path}; see the service log", 500)


@web.middleware
async def auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    token = request.app[SERVICE].token
    if token and request.path.startswith("/api/") and request.path != "/api/health":
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {token}".encode()):
            return error(f"{request.path} needs 'Authorization: Bearer <token>' "
                         f"({'wrong' if given else 'missing'} header)", 401, "Authorization")
    return await handler(request)


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestError("body", "body: expected JSON") from None


def svc(request: web.Request) -> Service:
    return request.app[SERVICE]


# ---- routes ----------------------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def get_options(request: web.Request) -> web.Response:
    return web.json_response(forms.options())


async def post_upload(request: web.Request) -> web.Response:
    q = request.query
    body = await request.read()
    record = await asyncio.to_thread(uploads.store_upload, svc(request).root / "uploads", body,
                                     q.get("kind", ""), q.get("task", ""), q.get("filename", "data.jsonl"))
    svc(request).store.add_upload(record)
    return web.json_response({k: record[k] for k in ("id", "filename", "kind", "task", "rows")}, status=201)


def _upload_file(s: Service, upload_id: str | None, field: str, kind: str) -> tuple[str, int] | None:
    if upload_id is None:
        return None
    up = s.store.upload(upload_id)
    if up is None:
        raise RequestError(field, f"{field}: no upload {upload_id}")
    if up["kind"] != kind:
        raise RequestError(field, f"{field}: upload {upload_id} is a {up['kind']} file, not {kind}")
    return up["path"], up["rows"]


async def post_job(request: web.Request) -> web.Response:
    s = svc(request)
    req = forms.parse_job_request(await read_json(request))
    files = {"train": _upload_file(s, req.train_upload, "train_upload", "train"),
             "val": _upload_file(s, req.val_upload, "val_upload", "val")}
    job_id = s.runner.new_id()
    out = s.runner.job_dir(job_id) / "out"
    config = await asyncio.to_thread(forms.job_config, req, out, s.root / "models", files)
    s.runner.submit(req.name, req.as_dict(), config, job_id=job_id)
    return web.json_response(s.view(s.store.job(job_id)), status=201)


async def list_jobs(request: web.Request) -> web.Response:
    q = request.query
    status = q.get("status") or None
    if status is not None and status not in STATUSES:
        raise RequestError("status", f"status: expected one of {', '.join(STATUSES)}")
    jobs = svc(request).store.jobs(status)
    if algorithm := q.get("algorithm"):
        jobs = [j for j in jobs if j["request"]["algorithm"] == algorithm.upper()]
    if task := q.get("task"):
        jobs = [j for j in jobs if j["request"]["task"]["id"] == task]
    if text := q.get("q", "").strip().lower():
        jobs = [j for j in jobs if text in j["name"].lower() or text in j["id"]]
    return web.json_response({"jobs": [svc(request).view(j, detail=False) for j in jobs]})


async def get_job(request: web.Request) -> web.Response:
    s = svc(request)
    return web.json_response(s.view(s.job_or_404(request.match_info["id"])))


async def get_metrics(request: web.Request) -> web.Response:
    job = svc(request).job_or_404(request.match_info["id"])
    return web.json_response({"rows": await asyncio.to_thread(views.metrics_rows, job)})


async def get_log(request: web.Request) -> web.Response:
    job = svc(request).job_or_404(request.match_info["id"])
    raw = request.query.get("tail", "200")
    if not raw.isdigit() or not 0 <= int(raw) <= 10000:
        raise RequestError("tail", "tail: expected an integer in [0, 10000]")
    return web.json_response({"lines": procs.tail(Path(job["job_dir"]) / "log.txt", int(raw))})


async def _transition(request: web.Request, act, allowed: str, done: str) -> web.Response:
    """Cancel or resume (`act`: the runner's method); a job in another state is a 409 naming its status."""
    s = svc(request)
    job = s.job_or_404(request.match_info["id"])
    if not act(job["id"]):
        status = s.store.job(job["id"])["status"]
        raise RequestError("status", f"status: job {job['id']} is {status}; only a {allowed} job can be "
                           f"{done}", status=409)
    return web.json_response(s.view(s.store.job(job["id"])))


async def cancel_job(request: web.Request) -> web.Response:
    return await _transition(request, svc(request).runner.cancel, "queued or running", "cancelled")


async def resume_job(request: web.Request) -> web.Response:
    return await _transition(request, svc(request).runner.resume, "failed or cancelled", "resumed")


async def deploy_job(request: web.Request) -> web.Response:
    s = svc(request)
    job = s.job_or_404(request.match_info["id"])
    ckpt = views.final_checkpoint(job)
    if job["status"] != "succeeded" or ckpt is None:
        raise RequestError("status", f"status: job {job['id']} is {job['status']}"
                           + ("" if ckpt else " and has no final checkpoint") + "; only a succeeded job with its "
                           "model saved can be deployed", status=409)
    dep = await asyncio.to_thread(s.deployments.deploy, job, ckpt)
    return web.json_response(views.deployment_view(dep, s.deployments.api_key(dep["id"])), status=201)


def _deployment_or_404(s: Service, dep_id: str) -> dict:
    dep = s.store.deployment(dep_id)
    if dep is None:
        raise RequestError("id", f"id: no deployment {dep_id[:40]!r}", status=404)
    return dep


async def list_deployments(request: web.Request) -> web.Response:
    return web.json_response({"deployments": [views.deployment_view(d) for d in svc(request).store.deployments()]})


async def get_deployment(request: web.Request) -> web.Response:
    s = svc(request)
    dep = _deployment_or_404(s, request.match_info["id"])
    return web.json_response(views.deployment_view(dep, s.deployments.api_key(dep["id"])))


async def delete_deployment(request: web.Request) -> web.Response:
    s = svc(request)
    _deployment_or_404(s, request.match_info["id"])
    dep = await asyncio.to_thread(s.deployments.stop, request.match_info["id"])
    return web.json_response(views.deployment_view(dep))


async def chat(request: web.Request) -> web.Response:
    s = svc(request)
    dep = _deployment_or_404(s, request.match_info["id"])
    body = await read_json(request)
    return web.json_response(await s.deployments.chat(dep, body, s.session))


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


ROUTES = [
    ("GET", "/api/health", health), ("GET", "/api/options", get_options), ("GET", "/api/openapi.json", get_openapi),
    ("POST", "/api/uploads", post_upload),
    ("POST", "/api/jobs", post_job), ("GET", "/api/jobs", list_jobs), ("GET", "/api/jobs/{id}", get_job),
    ("GET", "/api/jobs/{id}/metrics", get_metrics), ("GET", "/api/jobs/{id}/log", get_log),
    ("POST", "/api/jobs/{id}/cancel", cancel_job), ("POST", "/api/jobs/{id}/resume", resume_job),
    ("POST", "/api/jobs/{id}/deploy", deploy_job),
    ("GET", "/api/deployments", list_deployments), ("GET", "/api/deployments/{id}", get_deployment),
    ("DELETE", "/api/deployments/{id}", delete_deployment), ("POST", "/api/deployments/{id}/chat", chat),
]


def create_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[errors, auth], client_max_size=MAX_BODY)
    app[SERVICE] = service
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)

    async def on_startup(app: web.Application) -> None:
        service.session = aiohttp.ClientSession()
        service.runner.start()

    async def on_cleanup(app: web.Application) -> None:
        service.runner.close()
        if service.session is not None:
            await service.session.close()
        service.store.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
