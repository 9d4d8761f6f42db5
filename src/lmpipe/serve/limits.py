"""What a request may ask of the server (`ServerLimits`), checked before the work each limit
guards: the request's size and the model's name before tokenizing, its tokens after, and a
queue slot (`Admission`); a request holds its slot and its jobs in a `Lease`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lmpipe.serve.errors import RequestError
from lmpipe.serve.schema import ChatRequest, CommonRequest


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


class Admission:
    """The limits for the model `name` (also known by `aliases`) with a context of `context`
    tokens, and the `queue_limit` slots of requests running or waiting: 429 when all are taken,
    503 once `alive()` (the model's worker thread) is False."""

    def __init__(
        self,
        limits: ServerLimits,
        name: str,
        aliases: set[str],
        context: int,
        alive: Callable[[], bool],
    ) -> None:
        self.limits, self.name, self.aliases, self.context = limits, name, aliases, context
        self.alive = alive
        self.in_use = 0
        self.slots_lock = threading.Lock()

    def take_slot(self) -> None:
        if not self.alive():
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

    def check_prompts(self, prompts: list[str]) -> None:
        if len(prompts) > self.limits.max_prompts:
            raise RequestError(
                f"{len(prompts)} prompts in one request; the limit is {self.limits.max_prompts}",
                param="prompt",
            )

    def check(self, req: CommonRequest, texts: list[str]) -> None:
        """The limits that need no tokenizer (run before admission)."""
        lim = self.limits
        if req.model not in (None, "", *self.aliases):
            raise RequestError(
                f"model {req.model!r} is not served here; use {self.name!r}",
                404,
                "model",
                "model_not_found",
            )
        if req.stream_options is not None and not req.stream:
            raise RequestError(
                "stream_options is only allowed with stream: true", param="stream_options"
            )
        for key in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, key, None)
            if value is not None and value > lim.max_tokens:
                raise RequestError(
                    f"{key} {value} is above this server's limit of {lim.max_tokens}", param=key
                )
        if req.n > lim.max_n:
            raise RequestError(f"n {req.n} is above this server's limit of {lim.max_n}", param="n")
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


class Cancellable(Protocol):
    """A job a lease ends when its request ends."""

    def cancel(self) -> None: ...


class Lease:
    """A request's claim on the server: at most one queue slot, and the jobs it submitted.
    `release` (idempotent) gives the slot back and cancels the jobs; the `Guard` middleware
    calls it when the HTTP request ends, however it ends."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.slot = False
        self.released = False
        self.jobs: list[Cancellable] = []

    def acquire(self) -> None:
        if self.released:
            raise RequestError("the client disconnected", 499)
        if not self.slot:
            self.admission.take_slot()
            self.slot = True

    def track(self, job: Cancellable) -> None:
        self.jobs.append(job)
        if self.released:
            job.cancel()

    def release(self) -> None:
        self.released = True
        for job in self.jobs:
            job.cancel()
        if self.slot:
            self.slot = False
            self.admission.give_slot()
