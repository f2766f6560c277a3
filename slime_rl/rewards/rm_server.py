"""`slime-rl serve-rm`: serve a Hugging Face sequence-classification model as a reward model over HTTP.

    slime-rl serve-rm --model DIR --port 8000            # then --reward.remote.url http://127.0.0.1:8000/score

DIR holds a checkpoint `AutoModelForSequenceClassification` loads with one output (`num_labels == 1`) and
a tokenizer `slime_rl.tokenizer.load_tokenizer` reads (an HF tokenizer, or the project's char tokenizer).

    POST /score   {"prompts": [str], "responses": [str], "labels": [any] (optional, unused)}
         200      {"rewards": [float]}    the model's logit for prompt + response, one per pair
    GET /health   200 {"status": "ok"}

The text scored is `prompt + response`, tokenized with the tokenizer's special tokens; a sequence longer
than `max_length` keeps its last `max_length` tokens (the response end). A batch is right-padded and scored
in one forward pass; the model's own pooling picks the last non-pad token. Forward passes run one at a
time on a worker thread, so /health answers while the model works.

A malformed body is a 4xx naming the field (never a 500); with `api_key`, /score needs
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal

from aiohttp import web

from rollout.http_conn import guarded_runner, serve_until_signal
from rollout.http_json import BadRequest, error_response, json_response, read_json, short

log = logging.getLogger(__name__)

SCORE_PATH = "/score"
HEADER_TIMEOUT_S = 10.0
_DTYPES = ("float32", "bfloat16", "float16")


class RMServeError(ValueError):
    """A `slime-rl serve-rm` setting that cannot work; the message starts with the flag."""


@dataclass
class RMServeConfig:
    """Settings of `slime-rl serve-rm`: one flag per field (`--field-name`), the comment is its help."""

    model: str  # HF sequence-classification checkpoint directory (num_labels = 1) with its tokenizer
    tokenizer: str | None = None  # tokenizer directory or 'char' (default: the model directory)
    host: str = "127.0.0.1"  # address to listen on
    port: int = 8000  # 0 = any free port (the printed line says which)
    api_key: str | None = None  # /score needs 'Authorization: Bearer KEY'
    max_batch_size: int = 64  # pairs per /score request (more is a 400)
    max_length: int | None = None  # tokens per sequence, longer ones keep their end (default: the model's limit)
    max_body_mb: float = 32.0  # request body size limit
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"  # cpu, cuda or cuda:N

    def validate(self) -> "RMServeConfig":
        """Raise RMServeError naming the first flag whose value cannot work; returns self."""
        checks = [
            ("--model", os.path.isfile(os.path.join(self.model, "config.json")),
             "a checkpoint directory holding config.json"),
            ("--port", 0 <= self.port <= 65535, "in 0..65535"),
            ("--api-key", self.api_key is None or (self.api_key.strip() == self.api_key != ""),
             "a non-blank key without surrounding whitespace"),
            ("--max-batch-size", self.max_batch_size >= 1, ">= 1"),
            ("--max-length", self.max_length is None or self.max_length >= 1, ">= 1"),
            ("--max-body-mb", self.max_body_mb > 0, "> 0"),
            ("--dtype", self.dtype in _DTYPES, f"one of {', '.join(_DTYPES)}"),
        ]
        for flag, ok, rule in checks:
            if not ok:
                raise RMServeError(f"{flag} must be {rule}, got {getattr(self, flag[2:].replace('-', '_'))!r}")
        return self


class RewardModelScorer:
    """The model and tokenizer of a checkpoint directory; `score(prompts, responses)` -> one logit each."""

    def __init__(self, model_dir: str, tokenizer: str | None = None, max_length: int | None = None,
                 dtype: str = "float32", device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification

        from slime_rl.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer or model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, dtype=getattr(torch, dtype)).to(device).eval()
        config = self.model.config
        if config.num_labels != 1:
            raise RMServeError(f"--model {model_dir}: num_labels is {config.num_labels}; a reward model has 1")
        if config.pad_token_id is None:  # the model's pooling finds the last token by the pad id
            config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = max_length or getattr(config, "max_position_embeddings", None)
        self.device = device
        self._lock = threading.Lock()  # one forward pass at a time

    def encode(self, prompts: list[str], responses: list[str]) -> list[list[int]]:
        """Token ids of each prompt + response (BadRequest naming the pair when it cannot be encoded)."""
        out = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                ids = self.tokenizer.encode(prompt + response, add_special_tokens=True)
            except ValueError as e:
                raise BadRequest(f"prompts[{i}] + responses[{i}]: cannot be tokenized: {e}") from None
            if not ids:
                raise BadRequest(f"prompts[{i}] + responses[{i}]: no tokens to score")
            out.append(ids[-self.max_length:] if self.max_length else ids)
        return out

    def score_ids(self, ids: list[list[int]]) -> list[float]:
        """The model's single logit per sequence: one right-padded forward pass."""
        import torch

        width = max(len(x) for x in ids)
        pad = self.model.config.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=self.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=self.device)
        with self._lock, torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        return [float(v) for v in logits[:, 0].float().cpu()]

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.score_ids(self.encode(prompts, responses))


def parse_score_body(body: dict, max_batch_size: int) -> tuple[list[str], list[str]]:
    """(prompts, responses) of a /score body; BadRequest naming the field when it is malformed."""
    lists = {}
    for key in ("prompts", "responses"):
        value = body.get(key)
        if not isinstance(value, list):
            raise BadRequest(f"{SCORE_PATH}: field {key!r} must be a list of strings, got {short(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise BadRequest(f"{SCORE_PATH}: {key}[{i}] must be a string, got {short(item)}")
        lists[key] = value
    prompts, responses = lists["prompts"], lists["responses"]
    if len(prompts) != len(responses):
        raise BadRequest(f"{SCORE_PATH}: 'prompts' has {len(prompts)} items and 'responses' {len(responses)}; "
                         "they must pair up")
    labels = body.get("labels")
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(prompts)):
        raise BadRequest(f"{SCORE_PATH}: field 'labels' must be a list of {len(prompts)} items when given")
    if not prompts:
        raise BadRequest(f"{SCORE_PATH}: 'prompts' is empty; nothing to score")
    if len(prompts) > max_batch_size:
        raise BadRequest(f"{SCORE_PATH}: {len(prompts)} pairs exceed the server's --max-batch-size "
                         f"{max_batch_size}; send smaller batches")
    unknown = sorted(set(body) - {"prompts", "responses", "labels"})
    if unknown:
        raise BadRequest(f"{SCORE_PATH}: unknown field {short(unknown[0])} (known: labels, prompts, responses)")
    return prompts, responses


def create_rm_app(scorer: Any, *, max_batch_size: int = 64, api_key: str | None = None,
                  max_body_bytes: int = 32 << 20) -> web.Application:
    """The aiohttp app of /score and /health for `scorer` (anything with `score(prompts, responses)`)."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="rm-score")

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if api_key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
                return error_response(f"{request.path} needs 'Authorization: Bearer <api key>'", 401)
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except BadRequest as e:
            return error_response(str(e), e.status)
        except Exception:  # noqa: BLE001 - no request may kill the server; the traceback goes to the log
            log.exception("%s failed", request.path)
            return error_response(f"{request.path}: internal error (see the server log)", 500)

    async def score(request: web.Request) -> web.Response:
        prompts, responses = parse_score_body(await read_json(request), max_batch_size)
        rewards = await asyncio.get_running_loop().run_in_executor(executor, scorer.score, prompts, responses)
        if not all(math.isfinite(r) for r in rewards):
            log.warning("the model gave non-finite rewards: %s", rewards)
        return json_response({"rewards": rewards})

    async def health(request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def close_executor(app: web.Application) -> None:
        executor.shutdown(wait=False, cancel_futures=True)

    app = web.Application(middlewares=[guard], client_max_size=max_body_bytes)
    app.router.add_post(SCORE_PATH, score)
    app.router.add_get("/health", health)
    app.on_cleanup.append(close_executor)
    return app


def serve_rm_main(cfg: RMServeConfig) -> int:
    """Validate, load the model, serve it until SIGINT/SIGTERM. Returns the exit code; a bad setting or a
    checkpoint that does not load raises RMServeError."""
    cfg.validate()
    if cfg.api_key is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"slime-rl serve-rm: WARNING: --host {cfg.host} without --api-key: anyone who can reach it can "
              "use it", file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        scorer = RewardModelScorer(cfg.model, cfg.tokenizer, cfg.max_length, cfg.dtype, cfg.device)
    except RMServeError:
        raise
    except Exception as e:  # noqa: BLE001 - a junk checkpoint fails in many ways, all the directory's fault
        raise RMServeError(f"--model {cfg.model}: cannot load: {type(e).__name__}: {' '.join(str(e).split())}") from e
    app = create_rm_app(scorer, max_batch_size=cfg.max_batch_size, api_key=cfg.api_key,
                        max_body_bytes=int(cfg.max_body_mb * (1 << 20)))
    banner = f"model {os.path.abspath(cfg.model)}, max batch {cfg.max_batch_size}, max length {scorer.max_length}"
    runner = guarded_runner(app, header_timeout_s=HEADER_TIMEOUT_S)
    return asyncio.run(serve_until_signal(runner, cfg.host, cfg.port, "slime-rl serve-rm", banner, RMServeError,
                                          path=SCORE_PATH))
