"""The service's state in one embedded SQLite file (`<root>/service.db`): jobs, uploads and deployments.

Rows are plain dicts; JSON columns (`request`, `config`) are decoded on the way out. One connection shared by
the API's handlers and the runner's thread, behind a lock (SQLite serialises writers anyway). A job's status
is one of STATUSES; `queued -> running -> succeeded | failed | cancelled`, and `resume` takes a failed or
cancelled job back to `queued`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ENDED = ("succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL,
    created_at REAL NOT NULL, started_at REAL, ended_at REAL,
    request TEXT NOT NULL, config TEXT NOT NULL, job_dir TEXT NOT NULL,
    pid INTEGER, pid_start TEXT, returncode INTEGER, error TEXT, attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, task TEXT NOT NULL, filename TEXT NOT NULL,
    path TEXT NOT NULL, rows INTEGER NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL,
    port INTEGER, pid INTEGER, pid_start TEXT, url TEXT, model TEXT, error TEXT
);
"""
_JSON_COLUMNS = ("request", "config")


class Store:
    def __init__(self, path: Path):
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            rows = [dict(r) for r in self._db.execute(sql, args).fetchall()]
        for row in rows:
            for col in _JSON_COLUMNS:
                if col in row and row[col] is not None:
                    row[col] = json.loads(row[col])
        return rows

    def _one(self, table: str, row_id: str) -> dict[str, Any] | None:
        rows = self._rows(f"SELECT * FROM {table} WHERE id = ?", (row_id,))
        return rows[0] if rows else None

    def _insert(self, table: str, values: dict[str, Any]) -> None:
        values = {k: json.dumps(v) if k in _JSON_COLUMNS else v for k, v in values.items()}
        cols = ", ".join(values)
        with self._lock:
            self._db.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(values))})",
                             tuple(values.values()))

    def _update(self, table: str, row_id: str, values: dict[str, Any], only_if: tuple[str, ...] = ()) -> bool:
        """Set `values`; with `only_if`, only while the row's status is one of them (True: it was updated)."""
        values = {k: json.dumps(v) if k in _JSON_COLUMNS else v for k, v in values.items()}
        sets = ", ".join(f"{k} = ?" for k in values)
        where = " AND status IN (%s)" % ", ".join("?" * len(only_if)) if only_if else ""
        with self._lock:
            cur = self._db.execute(f"UPDATE {table} SET {sets} WHERE id = ?{where}",
                                   (*values.values(), row_id, *only_if))
        return cur.rowcount > 0

    # jobs
    def add_job(self, job_id: str, name: str, request: dict, config: dict, job_dir: str) -> None:
        self._insert("jobs", {"id": job_id, "name": name, "status": "queued", "created_at": time.time(),
                              "request": request, "config": config, "job_dir": job_dir})

    def job(self, job_id: str) -> dict[str, Any] | None:
        return self._one("jobs", job_id)

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        if status:
            return self._rows("SELECT * FROM jobs WHERE status = ? ORDER BY created_at DESC, rowid DESC", (status,))
        return self._rows("SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC")

    def update_job(self, job_id: str, only_if: tuple[str, ...] = (), **values: Any) -> bool:
        return self._update("jobs", job_id, values, only_if)

    # uploads
    def add_upload(self, record: dict[str, Any]) -> None:
        self._insert("uploads", {**record, "created_at": time.time()})

    def upload(self, upload_id: str) -> dict[str, Any] | None:
        return self._one("uploads", upload_id)

    # deployments
    def add_deployment(self, record: dict[str, Any]) -> None:
        self._insert("deployments", {**record, "created_at": time.time()})

    def deployment(self, dep_id: str) -> dict[str, Any] | None:
        return self._one("deployments", dep_id)

    def deployments(self, job_id: str | None = None) -> list[dict[str, Any]]:
        if job_id:
            return self._rows("SELECT * FROM deployments WHERE job_id = ? ORDER BY created_at DESC", (job_id,))
        return self._rows("SELECT * FROM deployments ORDER BY created_at DESC")

    def update_deployment(self, dep_id: str, only_if: tuple[str, ...] = (), **values: Any) -> bool:
        return self._update("deployments", dep_id, values, only_if)
