"""HTTP server over an exported ONNX bundle: OpenAI-style completions, no torch.

    lmpipe serve models/onnx/rl [--host 127.0.0.1] [--port 8000]

`POST /v1/completions` (prompt, max_tokens, temperature, top_p, top_k, n, stop, seed, stream),
`GET /v1/models`, `GET /health`. Every bad request gets a 4xx with a message in OpenAI's error
shape; requests beyond `queue_limit` (running + waiting) get 429. One worker thread owns the
model: the requests that arrived while it was busy run together as the next batch (up to
`max_batch` rows of prompts × n), each row with its own settings; a row that ends leaves the
batch. Nothing here reads a file a client names.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmpipe.onnx.runtime import OnnxLM, Row


@dataclass(frozen=True)
class ServerLimits:
    max_tokens: int = 256
    max_n: int = 8
    max_prompts: int = 16
    queue_limit: int = 32
    max_batch: int = 32  # rows (prompts × n, over all requests) run together


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request that this server honours (others ignored)."""

    model_config = ConfigDict(extra="ignore", validate_default=True)

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt list is empty")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclass
class Job:
    """One request's rows, waiting for or riding in a batch; the worker puts its results on `out`:
    ("delta", [new text per row or None]), then ("done", result) or ("error", exception)."""

    req: CompletionRequest
    ids: list[list[int]]
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Completer:
    """The model, the request checks, and a batching worker: requests that wait while the model
    is busy are run together as one batch (each row with its own sampling settings, seed and
    token budget), so 16 clients cost little more than one. Text side: stop strings and
    incremental decoding for streams."""

    def __init__(
        self, bundle: str | Path, precision: str = "fp32", limits: ServerLimits | None = None
    ) -> None:
        self.lm = OnnxLM(bundle, precision=precision)
        self.name = Path(bundle).name + ("" if precision == "fp32" else f"-{precision}")
        self.limits = limits or ServerLimits()
        self.context = self.lm.meta["context"]
        self.pending = 0
        self.pending_lock = threading.Lock()
        self.waiting: deque[Job] = deque()
        self.wake = threading.Condition()
        self.batches = 0  # batches run so far (for /health and tests)
        self.worker = threading.Thread(target=self._work, name="lmpipe-batcher", daemon=True)
        self.worker.start()

    def admit(self) -> None:
        with self.pending_lock:
            if self.pending >= self.limits.queue_limit:
                raise RequestError(
                    f"server busy: {self.pending} requests running or queued "
                    f"(limit {self.limits.queue_limit}); retry later",
                    429,
                )
            self.pending += 1

    def release(self) -> None:
        with self.pending_lock:
            self.pending -= 1

    def prepare(self, req: CompletionRequest) -> tuple[list[str], list[list[int]]]:
        lim = self.limits
        if req.model not in (None, "", self.name, self.lm.meta["source"].get("variant")):
            raise RequestError(f"model {req.model!r} is not served here; use {self.name!r}",
                               404, "model")  # fmt: skip
        if req.max_tokens > lim.max_tokens:
            raise RequestError(f"max_tokens {req.max_tokens} is above this server's limit of "
                               f"{lim.max_tokens}", param="max_tokens")  # fmt: skip
        if req.n > lim.max_n:
            raise RequestError(f"n {req.n} is above this server's limit of {lim.max_n}",
                               param="n")  # fmt: skip
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) > lim.max_prompts:
            raise RequestError(f"{len(prompts)} prompts in one request; the limit is "
                               f"{lim.max_prompts}", param="prompt")  # fmt: skip
        ids = [self.lm.prompt_ids(p) for p in prompts for _ in range(req.n)]
        longest = max(map(len, ids))
        if longest + req.max_tokens > self.context:
            raise RequestError(
                f"the prompt takes {longest} tokens and max_tokens is {req.max_tokens}: together "
                f"more than the model's context of {self.context}; shorten the prompt or "
                "max_tokens",
                param="prompt",
            )
        return prompts, ids

    # ------------------------------------------------------------------ the batching worker

    def _take(self) -> list[Job]:
        """The oldest waiting job and those behind it, in order, while the batch stays within
        `max_batch` rows and the context (longest prompt + largest budget)."""
        with self.wake:
            while not self.waiting:
                self.wake.wait()
            batch = [self.waiting.popleft()]
            rows = len(batch[0].ids)
            width, budget = max(map(len, batch[0].ids)), batch[0].req.max_tokens
            while self.waiting:
                job = self.waiting[0]
                w, b = max(width, max(map(len, job.ids))), max(budget, job.req.max_tokens)
                if rows + len(job.ids) > self.limits.max_batch or w + b > self.context:
                    break
                batch.append(self.waiting.popleft())
                rows, width, budget = rows + len(job.ids), w, b
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            self.batches += 1
            try:
                self._run(batch)
            except Exception as err:
                for job in batch:
                    job.out.put(("error", err))

    def _run(self, batch: list[Job]) -> None:
        prompts: list[list[int]] = []
        rows: list[Row] = []
        spans: list[range] = []
        for job in batch:
            r = job.req
            rng = np.random.default_rng(r.seed)  # shared by the job's rows, as when alone
            spans.append(range(len(rows), len(rows) + len(job.ids)))
            prompts += job.ids
            rows += [Row(r.max_tokens, r.temperature, r.top_k, r.top_p, rng) for _ in job.ids]
        tokens: list[list[int]] = [[] for _ in rows]
        sent = [""] * len(rows)
        reason: list[str | None] = [None] * len(rows)
        done = [False] * len(batch)
        for step in self.lm.stream_rows(prompts, rows):
            for j, job in enumerate(batch):
                if done[j]:
                    continue
                deltas: list[str | None] = []
                for i in spans[j]:
                    deltas.append(None)
                    if reason[i] is not None:
                        continue
                    if job.cancelled.is_set():
                        reason[i] = "cancelled"
                    elif not step.live[i]:
                        reason[i] = "stop"  # EOS
                    else:
                        tokens[i].append(int(step.tokens[i]))
                        text = self.lm.decode(tokens[i])
                        stops = job.req.stop
                        cut = min((k for s in stops if (k := text.find(s)) >= 0), default=-1)
                        if cut >= 0:
                            text, reason[i] = text[:cut], "stop"
                        elif len(tokens[i]) == rows[i].max_new_tokens:
                            reason[i] = "length"
                        if not text.endswith("\ufffd") or reason[i]:  # wait for a whole char
                            deltas[-1] = text[len(sent[i]) :]
                            sent[i] = text
                    if reason[i] is not None:
                        step.live[i] = False
                job.out.put(("delta", deltas))
                if all(reason[i] is not None for i in spans[j]):
                    done[j] = True
                    job.out.put(("done", {
                        "finish_reason": [reason[i] for i in spans[j]],
                        "completion_tokens": sum(len(tokens[i]) for i in spans[j]),
                    }))  # fmt: skip

    def run(
        self, req: CompletionRequest, ids: list[list[int]], result: dict[str, Any]
    ) -> Iterator[list[str | None]]:
        """Per step, the new text of every row (None where there is none); at the end `result`
        holds each row's finish reason and its number of generated tokens. Closing the
        iterator early (a client gone) ends the request's rows at the next step."""
        job = Job(req, ids)
        with self.wake:
            self.waiting.append(job)
            self.wake.notify()
        try:
            while True:
                kind, value = job.out.get()
                if kind == "delta":
                    yield value
                elif kind == "done":
                    result.update(value)
                    return
                else:
                    raise value
        finally:
            job.cancelled.set()


def create_app(completer: Completer):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="lmpipe", version="1")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"] if x != "body")
            parts.append(f"{loc or 'body'}: {e['msg']}")
        return JSONResponse(error_body("; ".join(parts)), status_code=400)

    @app.exception_handler(RequestError)
    async def _bad(_request: Request, exc: RequestError):
        kind = "rate_limit_error" if exc.status == 429 else "invalid_request_error"
        return JSONResponse(error_body(str(exc), kind, exc.param), status_code=exc.status)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": completer.name, "pending": completer.pending,
                "batches": completer.batches}  # fmt: skip

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": completer.name, "object": "model",
                                            "created": 0, "owned_by": "lmpipe"}]}  # fmt: skip

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        _, ids = completer.prepare(req)
        completer.admit()
        cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created,
                "model": completer.name}  # fmt: skip
        result: dict[str, Any] = {}
        if not req.stream:
            try:
                steps = list(completer.run(req, ids, result))
            finally:
                completer.release()
            texts = ["".join(d[i] or "" for d in steps) for i in range(len(ids))]
            n_out = result["completion_tokens"]
            prompt_tokens = sum(map(len, ids))
            reasons = result["finish_reason"]
            choices = [
                {"text": t, "index": i, "logprobs": None, "finish_reason": reasons[i]}
                for i, t in enumerate(texts)
            ]
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_out,
                     "total_tokens": prompt_tokens + n_out}  # fmt: skip
            return {**head, "choices": choices, "usage": usage}

        def events() -> Iterator[str]:
            try:
                for deltas in completer.run(req, ids, result):
                    for i, d in enumerate(deltas):
                        if d:
                            chunk = {**head, "choices": [{"text": d, "index": i, "logprobs": None,
                                                          "finish_reason": None}]}  # fmt: skip
                            yield f"data: {json.dumps(chunk)}\n\n"
                for i, r in enumerate(result["finish_reason"]):
                    chunk = {**head, "choices": [{"text": "", "index": i, "logprobs": None,
                                                  "finish_reason": r}]}  # fmt: skip
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                completer.release()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
