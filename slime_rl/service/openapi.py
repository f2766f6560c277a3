"""The OpenAPI 3.1 document of the service's API (served at /api/openapi.json): what the UI uses, and what a
script can."""

from __future__ import annotations

from typing import Any

from slime_rl.service import forms
from slime_rl.service.store import STATUSES

_ERROR = {"type": "object", "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"]}},
          "required": ["error", "field"]}
_SELECTION = {"type": "object", "properties": {"id": {"type": "string"}, "path": {"type": "string"}},
              "required": ["id"]}


def _schemas() -> dict[str, Any]:
    hp = {}
    for h in forms.HYPERPARAMETERS.values():
        t = {"int": "integer", "float": "number", "bool": "boolean", "choice": "string"}[h.type]
        hp[h.name] = {"type": t, "default": h.default, "description": h.label}
        if h.choices:
            hp[h.name]["enum"] = list(h.choices)
        if h.min is not None:
            hp[h.name].update(minimum=h.min, maximum=h.max)
    return {
        "Error": _ERROR,
        "JobRequest": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": forms.MAX_NAME},
            "model": {**_SELECTION, "description": f"id: {', '.join(forms.MODELS)}; path for 'path'"},
            "algorithm": {"type": "string", "enum": list(forms.ALGORITHMS)},
            "task": {**_SELECTION, "description": f"id: {', '.join(forms.TASKS)}; path (pkg.module:factory) "
                     "for 'custom'"},
            "train_upload": {"type": ["string", "null"]}, "val_upload": {"type": ["string", "null"]},
            "hyperparameters": {"type": "object", "properties": hp, "additionalProperties": False},
        }, "required": ["model", "task"], "additionalProperties": False},
        "Job": {"type": "object", "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}, "status": {"type": "string", "enum": list(STATUSES)},
            "created_at": {"type": "number"}, "started_at": {"type": ["number", "null"]},
            "ended_at": {"type": ["number", "null"]}, "progress": {"type": "object"},
            "error": {"type": ["string", "null"]}, "checkpoint": {"type": ["string", "null"]},
            "time_table": {"type": ["object", "null"]}, "eval": {"type": ["object", "null"]},
            "gate": {"type": ["object", "null"]}, "deployment": {"type": ["object", "null"]}}},
        "Upload": {"type": "object", "properties": {k: {"type": "string"} for k in ("id", "filename", "kind", "task")}
                   | {"rows": {"type": "integer"}}},
        "Deployment": {"type": "object", "properties": {
            "id": {"type": "string"}, "job_id": {"type": "string"},
            "status": {"type": "string", "enum": ["starting", "ready", "failed", "stopped"]},
            "url": {"type": ["string", "null"], "description": "OpenAI-compatible base URL"},
            "api_key": {"type": "string", "description": "the server's key: Authorization: Bearer KEY"},
            "model": {"type": "string"}, "error": {"type": ["string", "null"]}}},
        "Chat": {"type": "object", "properties": {
            "messages": {"type": "array", "items": {"type": "object", "properties": {
                "role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 2048}}, "required": ["messages"]},
    }


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _op(summary: str, ok: str | dict | None = None, body: str | dict | None = None, params=(), status: str = "200"):
    responses: dict[str, Any] = {status: {"description": "OK"}}
    if ok:
        responses[status]["content"] = {"application/json": {"schema": _ref(ok) if isinstance(ok, str) else ok}}
    responses["4XX"] = {"description": "the error names the field",
                        "content": {"application/json": {"schema": _ref("Error")}}}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body:
        schema = _ref(body) if isinstance(body, str) else body
        ctype = "application/x-ndjson" if body == "jsonl" else "application/json"
        op["requestBody"] = {"required": True, "content": {ctype: {"schema": {"type": "string"} if body == "jsonl"
                                                                     else schema}}}
    if params:
        op["parameters"] = [{"name": n, "in": where, "required": where == "path", "schema": {"type": "string"},
                             "description": d} for n, where, d in params]
    return op


_ID = ("id", "path", "the job's id")
_DEP = ("id", "path", "the deployment's id")


def document() -> dict[str, Any]:
    jobs = {"type": "object", "properties": {"jobs": {"type": "array", "items": _ref("Job")}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "slime_rl job service", "version": "1"},
        "components": {"schemas": _schemas(),
                       "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "security": [{"token": []}],
        "paths": {
            "/api/health": {"get": {**_op("liveness (no token needed)"), "security": []}},
            "/api/openapi.json": {"get": _op("this document")},
            "/api/options": {"get": _op("models, algorithms, tasks and hyperparameters with defaults and ranges")},
            "/api/uploads": {"post": _op("upload a JSONL file; checked whole, nothing stored on failure", "Upload",
                                         "jsonl", [("kind", "query", "train or val"), ("task", "query", "task id"),
                                                   ("filename", "query", "the file's name")], "201")},
            "/api/jobs": {"post": _op("submit a job", "Job", "JobRequest", status="201"),
                          "get": _op("jobs, newest first", jobs,
                                     params=[("status", "query", "one of " + ", ".join(STATUSES)),
                                             ("algorithm", "query", "algorithm id"), ("task", "query", "task id"),
                                             ("q", "query", "text in the name or id")])},
            "/api/jobs/{id}": {"get": _op("a job, with its time table, evaluation, gate and deployment", "Job",
                                          params=[_ID])},
            "/api/jobs/{id}/metrics": {"get": _op("the run's metrics rows (metrics.jsonl)", params=[_ID])},
            "/api/jobs/{id}/log": {"get": _op("the log's last lines", params=[_ID, ("tail", "query", "lines")])},
            "/api/jobs/{id}/cancel": {"post": _op("cancel a queued or running job", "Job", params=[_ID])},
            "/api/jobs/{id}/resume": {"post": _op("queue a failed or cancelled job again, from its checkpoint",
                                                  "Job", params=[_ID])},
            "/api/jobs/{id}/deploy": {"post": _op("serve the job's model (OpenAI-compatible)", "Deployment",
                                                  params=[_ID], status="201")},
            "/api/deployments": {"get": _op("deployments, newest first")},
            "/api/deployments/{id}": {"get": _op("a deployment", "Deployment", params=[_DEP]),
                                      "delete": _op("stop a deployment", "Deployment", params=[_DEP])},
            "/api/deployments/{id}/chat": {"post": _op("send chat messages to the deployed model",
                                                       {"type": "object", "properties": {"reply": {"type": "string"}}},
                                                       "Chat", [_DEP])},
        },
    }
