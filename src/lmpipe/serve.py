"""HTTP server over an exported ONNX bundle: OpenAI's completions and chat completions, no torch.

    lmpipe serve models/onnx/rl [--host 127.0.0.1] [--port 8000] [--api-key KEY]

`POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}`,
`GET /health` (docs/serving.md is the manual). Every bad request gets a 4xx in OpenAI's error
shape, never a 500: the body is read, bounded and parsed here (not by FastAPI), and each limit is
checked before the work it guards — body size while reading, prompt characters before
tokenizing, tokens after tokenizing and before the model.

A request holds a `Lease`: at most one of the `queue_limit` slots and the jobs it submitted. The
`Guard` middleware owns it for the whole life of the HTTP request and releases it however that
ends (response sent, client gone at any point, error, cancellation), so capacity cannot leak.
One worker thread owns the model: the requests that arrived while it was busy run together as
the next batch (up to `max_batch` rows of prompts × n), each row with its own settings; a row
that ends leaves the batch. Nothing here reads a file a client names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmpipe.onnx.runtime import OnnxLM, Row, TextStream

log = logging.getLogger("lmpipe.serve")

LEASE = "lmpipe.lease"  # the ASGI scope key of a request's Lease
MAX_JSON_DEPTH = 32  # the request schema nests 5 deep (messages → part → text)
MAX_STOP_CHARS = 256  # per stop string: held-back text is checked against each on every token
DRAIN_BYTES = 16 << 20  # an oversized body up to this is read (and dropped) so the 413 arrives


@dataclass(frozen=True)
class ServerLimits:
    max_tokens: int = 256  # largest max_tokens; also the chat default, within the context
    max_n: int = 8
    max_prompts: int = 16  # prompts in one completions request
    queue_limit: int = 32  # requests running or waiting; beyond: 429
    max_batch: int = 32  # rows (prompts × n, over all requests) run together
    max_body_bytes: int = 1 << 20  # request body; beyond: 413
    max_prompt_chars: int = 32_768  # characters of prompt or message text, before tokenizing
    max_request_tokens: int = 32_768  # Σ over rows (prompts × n) of prompt + max_tokens


# ----------------------------------------------------------------------------- errors


class RequestError(ValueError):
    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, headers=None):
    from starlette.responses import JSONResponse

    kind = "server_error" if status >= 500 else ERROR_TYPES.get(status, "invalid_request_error")
    return JSONResponse(error_body(message, kind, param, code), status, headers=headers)


# ----------------------------------------------------------------------------- the body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object, or a RequestError that says what is wrong with it: not UTF-8,
    not JSON (NaN and Infinity included), not an object, nested too deeply, or holding a string
    that is not Unicode text (a lone surrogate such as "\\ud800")."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"the body is not valid UTF-8 (byte {err.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, NaN, an integer of more than 4300 digits
        raise RequestError(f"the body is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise RequestError("the body must be a JSON object")
    todo: list[tuple[Any, int, str]] = [(obj, 1, "body")]
    while todo:  # iterative: the walk itself must not recurse on hostile input
        value, depth, where = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, v in items:
            path = f"{where}.{key}" if isinstance(key, int) or _is_text(key) else where
            if isinstance(key, str) and not _is_text(key):
                raise RequestError(f"a key in {where} is not valid Unicode (a lone surrogate)")
            if isinstance(v, str) and not _is_text(v):
                raise RequestError(
                    f"{path.removeprefix('body.')} is not valid Unicode text (it holds a lone "
                    "surrogate such as \\ud800)",
                    param=str(key) if isinstance(key, str) else None,
                )
            if isinstance(v, dict | list):
                todo.append((v, depth + 1, path))
    return obj


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ----------------------------------------------------------------------------- requests

# OpenAI parameters this server does not implement, with the values that ask for nothing (sent
# by many clients by default); any other value is a 400 that names the parameter.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False),
    "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "reasoning_effort": (None,), "verbosity": (None,),
    "web_search_options": (None,), "store": (None, False),
}  # fmt: skip
# Identifiers for the caller's own bookkeeping: they change nothing in the output; accepted.
IGNORED = frozenset({"user", "metadata", "safety_identifier", "prompt_cache_key", "service_tier"})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    """The sampling fields both endpoints honour. `top_k` is lmpipe's (0 = off)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(1.0, ge=0, le=1)  # 0: the most likely token only (greedy)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to 4 non-empty strings of up to {MAX_STOP_CHARS} "
                             "characters")  # fmt: skip
        return stops


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt list is empty")
        return v

    def texts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class ChatMessage(BaseModel):
    """A message; `content` a string or text parts (joined with newlines). `developer` is
    OpenAI's newer name for `system`. Fields an assistant message may carry when a client sends
    the previous answer back are accepted empty only."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    function_call: None = None
    refusal: None = None
    audio: None = None
    annotations: list[Any] | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[dict[str, Any]] | None) -> str:
        if v is None:
            raise ValueError("a message needs content (a string or a list of text parts)")
        if isinstance(v, str):
            return v
        texts = []
        for part in v:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r} is not supported: "
                                 'send {"type": "text", "text": "..."} parts')  # fmt: skip
            if extra := sorted(set(part) - {"type", "text"}):
                raise ValueError(f"unknown fields in a text part: {', '.join(extra)}")
            texts.append(part["text"])
        return "\n".join(texts)

    @field_validator("tool_calls", "annotations")
    @classmethod
    def _empty(cls, v: list[Any] | None) -> None:
        if v:
            raise ValueError("tool calls and annotations are not supported by this server")
        return None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and "\x00" in v:
            raise ValueError("name must not contain NUL characters")
        return v

    def for_template(self) -> dict[str, str]:
        m = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        return m if self.name is None else {**m, "name": self.name}


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    """`value` is one of the values that ask for nothing (0.0 counts as 0; True is not 1)."""
    return any(
        value is v or (value == v and isinstance(value, bool) == isinstance(v, bool))
        for v in neutral
    )


def read_request(raw: dict[str, Any], schema: type[_Common]) -> Any:
    """Validate a parsed body: unknown parameters and unsupported ones (with a value that asks
    for something) are named in the 400, then the fields are checked."""
    fields = set(schema.model_fields)
    unknown = sorted(
        k for k in raw if k not in fields and k not in UNSUPPORTED and k not in IGNORED
    )
    if unknown:
        raise RequestError(f"unknown parameter(s): {', '.join(unknown)}", param=unknown[0])
    asked = [k for k in raw if k in UNSUPPORTED and not _neutral(raw[k], UNSUPPORTED[k])]
    if asked:
        raise RequestError(
            f"this server does not support: {', '.join(asked)} (leave them out)", param=asked[0]
        )
    try:
        return schema.model_validate({k: v for k, v in raw.items() if k in fields})
    except ValidationError as err:
        parts, param = [], None
        for e in err.errors(include_input=False, include_url=False):
            loc = ".".join(str(x) for x in e["loc"])
            param = param or (str(e["loc"][0]) if e["loc"] else None)
            parts.append(f"{loc or 'body'}: {e['msg']}")
        raise RequestError("; ".join(parts), param=param) from None


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: list[str]


@dataclass
class Job:
    """One request's rows, waiting for or riding in a batch. The worker thread posts events to
    the request's event loop: ("delta", [new text per row]) and at the end ("done", result) or
    ("error", exception); `cancel` posts ("cancelled", None) and ends the rows."""

    rows: list[list[int]]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.post("cancelled", None)


class Lease:
    """A request's claim on the server: at most one queue slot, and the jobs it submitted.
    `release` (idempotent) gives the slot back and cancels the jobs; the `Guard` middleware
    calls it when the HTTP request ends, however it ends."""

    def __init__(self, completer: Completer) -> None:
        self.completer = completer
        self.slot = False
        self.released = False
        self.jobs: list[Job] = []

    def acquire(self) -> None:
        if self.released:
            raise RequestError("the client disconnected", 499)
        if not self.slot:
            self.completer.take_slot()
            self.slot = True

    def track(self, job: Job) -> None:
        self.jobs.append(job)
        if self.released:
            job.cancel()

    def release(self) -> None:
        self.released = True
        for job in self.jobs:
            job.cancel()
        if self.slot:
            self.slot = False
            self.completer.give_slot()


# ----------------------------------------------------------------------------- the model


class Completer:
    """The model, the request checks, and a batching worker: requests that wait while the model
    is busy are run together as one batch (each row with its own sampling settings, seed and
    token budget), so 16 clients cost little more than one. Text side: stop strings and
    incremental decoding (`TextStream`)."""

    def __init__(
        self, bundle: str | Path, precision: str = "fp32", limits: ServerLimits | None = None
    ) -> None:
        self.lm = OnnxLM(bundle, precision=precision)
        self.name = Path(bundle).name + ("" if precision == "fp32" else f"-{precision}")
        self.aliases = {self.name, self.lm.meta.get("source", {}).get("variant")} - {None}
        self.limits = limits or ServerLimits()
        self.context = self.lm.meta["context"]
        self.template = self.lm.template  # loaded now: a broken template fails at start
        self.stop_ids = self.lm.stop_ids
        self.in_use = 0
        self.slots_lock = threading.Lock()
        self.waiting: deque[Job] = deque()
        self.wake = threading.Condition()
        self.batches = 0  # batches run so far (for /health and tests)
        self.worker = threading.Thread(target=self._work, name="lmpipe-batcher", daemon=True)
        self.worker.start()

    # ------------------------------------------------------------------ admission

    @property
    def pending(self) -> int:
        return self.in_use

    def take_slot(self) -> None:
        if not self.worker.is_alive():
            raise RequestError("the model's worker thread has stopped; restart the server", 503)
        with self.slots_lock:
            if self.in_use >= self.limits.queue_limit:
                raise RequestError(
                    f"server busy: {self.in_use} requests running or queued "
                    f"(limit {self.limits.queue_limit}); retry later",
                    429,
                )
            self.in_use += 1

    def give_slot(self) -> None:
        with self.slots_lock:
            self.in_use -= 1

    def status(self) -> dict[str, Any]:
        cap = self.limits.queue_limit
        return {"model": self.name, "capacity": cap, "in_use": self.in_use,
                "free": cap - self.in_use, "waiting": len(self.waiting),
                "batches": self.batches, "worker_alive": self.worker.is_alive()}  # fmt: skip

    # ------------------------------------------------------------------ checks

    def check(self, req: _Common, texts: list[str]) -> None:
        """The limits that need no tokenizer (run before admission)."""
        lim = self.limits
        if req.model not in (None, "", *self.aliases):
            raise RequestError(f"model {req.model!r} is not served here; use {self.name!r}",
                               404, "model", "model_not_found")  # fmt: skip
        if req.stream_options is not None and not req.stream:
            raise RequestError("stream_options is only allowed with stream: true",
                               param="stream_options")  # fmt: skip
        for key in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, key, None)
            if value is not None and value > lim.max_tokens:
                raise RequestError(f"{key} {value} is above this server's limit of "
                                   f"{lim.max_tokens}", param=key)  # fmt: skip
        if req.n > lim.max_n:
            raise RequestError(f"n {req.n} is above this server's limit of {lim.max_n}",
                               param="n")  # fmt: skip
        chars = sum(map(len, texts))
        if chars > lim.max_prompt_chars:
            raise RequestError(
                f"the prompt text is {chars:,} characters; this server takes up to "
                f"{lim.max_prompt_chars:,} per request (--max-prompt-chars)",
                param="messages" if isinstance(req, ChatRequest) else "prompt",
            )

    def check_tokens(self, prompts: list[list[int]], n: int, max_tokens: int, param: str) -> None:
        """The limits on tokens (run after admission and tokenization, before the model)."""
        if not all(prompts):
            raise RequestError("the prompt encodes to no tokens", param=param)
        longest = max(map(len, prompts))
        if longest + max_tokens > self.context:
            raise RequestError(
                f"the prompt takes {longest} tokens and max_tokens is {max_tokens}: together "
                f"more than the model's context of {self.context}; shorten the prompt or "
                "max_tokens",
                param=param,
            )
        total = n * sum(len(p) + max_tokens for p in prompts)
        if total > self.limits.max_request_tokens:
            raise RequestError(
                f"this request needs up to {total:,} tokens (n × (prompt + max_tokens) over its "
                f"prompts); the server's limit is {self.limits.max_request_tokens:,} "
                "(--max-request-tokens): lower n, max_tokens or the prompt",
                param="max_tokens",
            )

    def submit(self, rows: list[list[int]], sampling: Sampling, lease: Lease) -> Job:
        job = Job(rows, sampling, asyncio.get_running_loop())
        lease.track(job)
        if not job.cancelled.is_set():
            with self.wake:
                self.waiting.append(job)
                self.wake.notify()
        return job

    # ------------------------------------------------------------------ the batching worker

    def _take(self) -> list[Job]:
        """The oldest waiting job and those behind it, in order, while the batch stays within
        `max_batch` rows and the context (longest prompt + largest budget). Jobs whose client
        left while they waited are dropped here, before any prefill."""
        with self.wake:
            while True:
                while self.waiting and self.waiting[0].cancelled.is_set():
                    self.waiting.popleft()
                if self.waiting:
                    break
                self.wake.wait()
            batch = [self.waiting.popleft()]
            rows = len(batch[0].rows)
            width, budget = max(map(len, batch[0].rows)), batch[0].sampling.max_tokens
            while self.waiting:
                job = self.waiting[0]
                if job.cancelled.is_set():
                    self.waiting.popleft()
                    continue
                w, b = max(width, max(map(len, job.rows))), max(budget, job.sampling.max_tokens)
                if rows + len(job.rows) > self.limits.max_batch or w + b > self.context:
                    break
                batch.append(self.waiting.popleft())
                rows, width, budget = rows + len(job.rows), w, b
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            self.batches += 1
            try:
                self._run(batch)
            except Exception as err:
                log.exception("batch failed")
                for job in batch:
                    job.post("error", err)

    def _run(self, batch: list[Job]) -> None:
        prompts: list[list[int]] = []
        rows: list[Row] = []
        texts: list[TextStream] = []
        spans: list[range] = []
        for job in batch:
            s = job.sampling
            rng = np.random.default_rng(s.seed)  # shared by the job's rows, as when alone
            spans.append(range(len(rows), len(rows) + len(job.rows)))
            prompts += job.rows
            rows += [Row(s.max_tokens, s.temperature, s.top_k, s.top_p, rng) for _ in job.rows]
            texts += [TextStream(self.lm.decode, s.stop) for _ in job.rows]
        counts = [0] * len(rows)
        reason: list[str | None] = [None] * len(rows)
        done = [False] * len(batch)
        for step in self.lm.stream_rows(prompts, rows):
            for j, job in enumerate(batch):
                if done[j]:
                    continue
                deltas: list[str] = []
                for i in spans[j]:
                    d = ""
                    if reason[i] is None:
                        if job.cancelled.is_set():
                            reason[i] = "cancelled"
                        elif not step.live[i]:  # a stop token
                            d, reason[i] = texts[i].finish(), "stop"
                        else:
                            counts[i] += 1
                            d = texts[i].push(int(step.tokens[i]))
                            if texts[i].stopped:
                                reason[i] = "stop"
                            elif counts[i] == rows[i].max_new_tokens:
                                d, reason[i] = d + texts[i].finish(), "length"
                        if reason[i] is not None:
                            step.live[i] = False
                    deltas.append(d)
                if any(deltas):
                    job.post("delta", deltas)
                if all(reason[i] is not None for i in spans[j]):
                    done[j] = True
                    job.post("done", {
                        "text": [texts[i].text for i in spans[j]],
                        "finish_reason": [reason[i] for i in spans[j]],
                        "completion_tokens": sum(counts[i] for i in spans[j]),
                    })  # fmt: skip


# ----------------------------------------------------------------------------- the middleware


class Guard:
    """Pure ASGI middleware around the app: the API key, the body (read here, bounded: 413), and
    the request's `Lease`, released when the request ends however it ends. After the body, only
    this middleware reads the connection: a client that leaves releases its lease at once, and
    the app sees `http.disconnect`."""

    def __init__(self, app, completer: Completer, api_key: str | None = None) -> None:
        self.app, self.completer = app, completer
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, self.key):
                msg = (
                    "invalid API key" if given else "an API key is required (Authorization: Bearer)"
                )
                response = error_response(401, msg, code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                return await response(scope, receive, send)
        body = await self._read_body(scope, receive, send, headers)
        if body is None:
            return
        lease = Lease(self.completer)
        scope[LEASE] = lease
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            lease.release()

        first = True

        async def app_receive():
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        watcher = asyncio.ensure_future(watch())
        try:
            await self.app(scope, app_receive, send)
        finally:
            watcher.cancel()
            lease.release()

    async def _read_body(self, scope, receive, send, headers) -> bytes | None:
        """The whole body, or None once a 413 went out (or the client left mid-upload)."""
        limit = self.completer.limits.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        chunks, size = [], 0
        over = declared > limit
        if not over or declared <= DRAIN_BYTES:
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                more = message.get("more_body", False)
                if size > limit:
                    over = True
                    if size > DRAIN_BYTES:
                        break
                elif not over:
                    chunks.append(chunk)
        if over:
            response = error_response(
                413,
                f"the request body is over this server's limit of {limit:,} bytes "
                "(--max-body-bytes)",
            )
            await response(scope, receive, send)
            return None
        return b"".join(chunks)


# ----------------------------------------------------------------------------- the app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(completer: Completer, api_key: str | None = None, docs: bool = False):
    """The FastAPI app. `api_key`: required as `Authorization: Bearer` on every endpoint but
    /health. `docs`: serve /docs, /redoc and /openapi.json (off by default)."""
    import anyio
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response, StreamingResponse

    from lmpipe.chat import TemplateError

    app = FastAPI(
        title="lmpipe", version="1", docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None,
    )  # fmt: skip
    app.add_middleware(Guard, completer=completer, api_key=api_key)

    @app.exception_handler(RequestError)
    async def _bad(_request: Request, exc: RequestError):
        return error_response(exc.status, str(exc), exc.param, exc.code)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "bad request"
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        return error_response(400, "; ".join(str(e.get("msg")) for e in exc.errors()))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception):
        log.error("internal error: %r", exc)
        return error_response(500, "internal server error")

    @app.get("/health")
    async def health():
        s = completer.status()
        ready = s["worker_alive"] and s["free"] > 0
        status = "ok" if ready else "busy" if s["worker_alive"] else "down"
        return JSONResponse({"status": status, **s}, 200 if ready else 503)

    def model_card() -> dict[str, Any]:
        return {"id": completer.name, "object": "model", "created": 0, "owned_by": "lmpipe"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in completer.aliases:
            raise RequestError(f"the model {model_id!r} does not exist; this server has "
                               f"{completer.name!r}", 404, "model", "model_not_found")  # fmt: skip
        return model_card()

    schema = {"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}}

    async def read(request: Request, kind: type[_Common]):
        body = await request.body()
        if len(body) > 1 << 16:  # parse big bodies off the event loop: /health stays quick
            return await anyio.to_thread.run_sync(lambda: read_request(parse_body(body), kind))
        return read_request(parse_body(body), kind)

    async def start(request: Request, rows, sampling: Sampling) -> tuple[Job, tuple]:
        """Submit the job and wait for its first event, so an error before any token is still
        an HTTP status."""
        job = completer.submit(rows, sampling, request.scope[LEASE])
        first = await job.events.get()
        if first[0] == "error":
            raise first[1]
        return job, first

    async def events(job: Job, first: tuple) -> AsyncIterator[tuple[str, Any]]:
        item = first
        try:
            while True:
                yield item
                if item[0] in ("done", "cancelled"):
                    return
                item = await job.events.get()
                if item[0] == "error":
                    raise item[1]
        finally:
            job.cancel()  # a no-op once done; ends the rows if the client left

    async def collect(job: Job, first: tuple) -> dict[str, Any] | None:
        async for kind, value in events(job, first):
            if kind == "done":
                return value
        return None  # cancelled: the client is gone

    async def admit_and_encode(request: Request, encode: Callable[[], Any]):
        request.scope[LEASE].acquire()  # 429 when full; everything costly comes after
        return await anyio.to_thread.run_sync(encode)

    @app.post("/v1/completions", openapi_extra=schema)
    async def completions(request: Request):
        req: CompletionRequest = await read(request, CompletionRequest)
        prompts = req.texts()
        if len(prompts) > completer.limits.max_prompts:
            raise RequestError(f"{len(prompts)} prompts in one request; the limit is "
                               f"{completer.limits.max_prompts}", param="prompt")  # fmt: skip
        completer.check(req, prompts)
        distinct = list(dict.fromkeys(prompts))  # each distinct prompt tokenized once
        try:
            encoded = await admit_and_encode(
                request, lambda: [completer.lm.prompt_ids(p) for p in distinct]
            )
        except TemplateError as err:
            raise RequestError(f"the prompt does not fit the model's chat template: {err}",
                               param="prompt") from None  # fmt: skip
        ids = dict(zip(distinct, encoded, strict=True))
        completer.check_tokens([ids[p] for p in prompts], req.n, req.max_tokens, "prompt")
        rows = [ids[p] for p in prompts for _ in range(req.n)]
        sampling = Sampling(req.max_tokens, req.temperature, req.top_k, req.top_p, req.seed,
                            req.stop)  # fmt: skip
        job, first = await start(request, rows, sampling)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                "created": int(time.time()), "model": completer.name}  # fmt: skip
        prompt_tokens = sum(len(ids[p]) for p in prompts)
        if not req.stream:
            result = await collect(job, first)
            if result is None:
                return Response(status_code=499)
            choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(result["text"], result["finish_reason"],
                                                      strict=True))]  # fmt: skip
            usage = _usage(prompt_tokens, result["completion_tokens"])
            return {**head, "choices": choices, "usage": usage}

        usage_chunk = req.stream_options is not None and req.stream_options.include_usage

        def chunk(i: int, text: str, reason: str | None) -> dict[str, Any]:
            c = {"text": text, "index": i, "logprobs": None, "finish_reason": reason}
            return {**head, "choices": [c], **({"usage": None} if usage_chunk else {})}

        async def body() -> AsyncIterator[str]:
            try:
                async for kind, value in events(job, first):
                    if kind == "delta":
                        for i, d in enumerate(value):
                            if d:
                                yield _sse(chunk(i, d, None))
                    elif kind == "done":
                        for i, r in enumerate(value["finish_reason"]):
                            yield _sse(chunk(i, "", r))
                        if usage_chunk:
                            u = _usage(prompt_tokens, value["completion_tokens"])
                            yield _sse({**head, "choices": [], "usage": u})
                yield "data: [DONE]\n\n"
            except Exception as err:  # after the 200: the error goes in the stream
                log.error("stream failed: %r", err)
                yield _sse(error_body("internal server error", "server_error"))

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", openapi_extra=schema)
    async def chat_completions(request: Request):
        req: ChatRequest = await read(request, ChatRequest)
        if completer.template is None:
            raise RequestError(
                f"the bundle {completer.name!r} has no chat template, so it cannot take "
                "messages: use /v1/completions with a prompt, or re-export the model from a "
                "folder with a chat template (chat_template.jinja or tokenizer_config.json)",
                param="messages",
            )
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise RequestError("give max_completion_tokens or max_tokens, not both",
                               param="max_tokens")  # fmt: skip
        messages = [m.for_template() for m in req.messages]
        completer.check(req, [m["content"] for m in messages])
        try:
            prompt = await admit_and_encode(request, lambda: completer.lm.chat_ids(messages))
        except TemplateError as err:
            raise RequestError(f"these messages do not fit the model's chat template: {err}",
                               param="messages") from None  # fmt: skip
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:  # OpenAI's default: as long as the context allows
            max_tokens = max(1, min(completer.limits.max_tokens, completer.context - len(prompt)))
        completer.check_tokens([prompt], req.n, max_tokens, "messages")
        sampling = Sampling(max_tokens, req.temperature, req.top_k, req.top_p, req.seed,
                            req.stop)  # fmt: skip
        job, first = await start(request, [prompt] * req.n, sampling)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()),
                "model": completer.name, "system_fingerprint": None}  # fmt: skip
        if not req.stream:
            result = await collect(job, first)
            if result is None:
                return Response(status_code=499)
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                 "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(result["text"], result["finish_reason"],
                                               strict=True))
            ]  # fmt: skip
            usage = _usage(len(prompt), result["completion_tokens"])
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage}

        usage_chunk = req.stream_options is not None and req.stream_options.include_usage
        head = {**head, "object": "chat.completion.chunk"}

        def chunk(i: int, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
            c = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {**head, "choices": [c], **({"usage": None} if usage_chunk else {})}

        async def body() -> AsyncIterator[str]:
            try:
                for i in range(req.n):
                    yield _sse(chunk(i, {"role": "assistant", "content": ""}, None))
                async for kind, value in events(job, first):
                    if kind == "delta":
                        for i, d in enumerate(value):
                            if d:
                                yield _sse(chunk(i, {"content": d}, None))
                    elif kind == "done":
                        for i, r in enumerate(value["finish_reason"]):
                            yield _sse(chunk(i, {}, r))
                        if usage_chunk:
                            u = _usage(len(prompt), value["completion_tokens"])
                            yield _sse({**head, "choices": [], "usage": u})
                yield "data: [DONE]\n\n"
            except Exception as err:
                log.error("stream failed: %r", err)
                yield _sse(error_body("internal server error", "server_error"))

        return StreamingResponse(body(), media_type="text/event-stream")

    return app
