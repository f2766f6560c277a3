"""JSON over HTTP for rewards that call a server (a remote reward model, an LLM judge).

`JsonPoster.post(path, body)` sends one JSON POST and returns the parsed JSON answer, with

- a timeout per attempt (`timeout_s`: urllib's socket timeout, so it bounds the connect and every read;
  the runner's `reward.timeout_s` bounds the whole call);
- retries with exponential backoff (`backoff_s`, then twice that, ...) when nothing answers (connection
  refused or reset, a timeout) or the server answers 5xx or 429; any other 4xx is the request's fault and
  fails at once, as does a 2xx answer that is not JSON;
- a limit of `max_concurrency` requests in flight (None: no limit of its own), shared by every thread
  using the poster (a slot is held for one attempt, never during a backoff wait);
- an optional bearer token read once from the environment variable named by `api_key_env`; the token is
  never put in an error message or a log line.

Every failure raises `RewardHTTPError` naming the URL, the attempts made and the last reason; the runner
turns it into the sample's failure reward. The standard library is enough: one short-lived connection per
attempt keeps the poster thread-safe without a connection pool.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

_ERROR_BODY_CHARS = 200  # of a failed answer, quoted in the error


class RewardHTTPError(RuntimeError):
    """A request to a reward endpoint failed (after its retries, when the failure was retryable)."""


class _Retryable(Exception):
    """One attempt failed in a way that another attempt may not."""


class JsonPoster:
    """POST JSON to `base_url` + path, with timeouts, retries, backoff and a concurrency limit (module doc).

    `where` names the config section in errors (`reward.remote`). `sleep` is the backoff wait (tests
    replace it to record the delays)."""

    def __init__(self, base_url: str, *, where: str, timeout_s: float, retries: int, backoff_s: float,
                 max_concurrency: int | None, api_key_env: str | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"{where}.url must be an http:// or https:// URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.where = where
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.sleep = sleep
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key_env:
            token = os.environ.get(api_key_env, "")
            if not token.strip():
                raise ValueError(f"{where}.api_key_env: the environment variable {api_key_env} is not set or empty")
            self._headers["Authorization"] = f"Bearer {token.strip()}"
        self._slots = contextlib.nullcontext() if max_concurrency is None else threading.Semaphore(max_concurrency)
        self._lock = threading.Lock()
        self.attempts = 0  # HTTP attempts made, retries included (all threads)

    def url(self, path: str = "") -> str:
        return self.base_url + path

    @property
    def worst_case_s(self) -> float:
        """The longest one `post` may take when every attempt times out: attempts x timeout + backoffs."""
        backoffs = sum(self.backoff_s * 2 ** k for k in range(self.retries))
        return (self.retries + 1) * self.timeout_s + backoffs

    def post(self, path: str, body: Any) -> Any:
        """The JSON answer of POST `path`; raises RewardHTTPError when every attempt failed."""
        url = self.url(path)
        data = json.dumps(body, allow_nan=False).encode()
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._attempt(url, data)
            except _Retryable as e:
                reason = str(e)
        raise RewardHTTPError(f"POST {url} failed after {self.retries + 1} attempt(s): {reason}")

    def _attempt(self, url: str, data: bytes) -> Any:
        request = urllib.request.Request(url, data=data, method="POST", headers=self._headers)
        with self._slots:
            with self._lock:
                self.attempts += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    status, raw = resp.status, resp.read()
            except urllib.error.HTTPError as e:
                status, raw = e.code, _read_quietly(e)
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                    http.client.HTTPException) as e:
                raise _Retryable(_describe(e)) from None
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}: {excerpt(raw)}")
        if status >= 400:
            raise RewardHTTPError(f"POST {url}: HTTP {status} (not retried): {excerpt(raw)}")
        try:
            return json.loads(raw)
        except ValueError:
            raise RewardHTTPError(f"POST {url}: the answer is not JSON: {excerpt(raw)}") from None


def _read_quietly(e: urllib.error.HTTPError) -> bytes:
    try:
        return e.read()
    except (OSError, http.client.HTTPException):
        return b""


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, (TimeoutError, socket.timeout)):
        return f"timed out ({type(e).__name__}: {e})"
    return f"{type(e).__name__}: {e}"


def excerpt(value: Any, limit: int = _ERROR_BODY_CHARS) -> str:
    """A quoted excerpt for an error message: an answer's body (bytes, decoded and stripped), a text, or the
    repr of anything else, cut at `limit` characters."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace").strip()
    else:
        text = value if isinstance(value, str) else repr(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")
