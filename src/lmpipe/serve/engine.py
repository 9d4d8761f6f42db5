"""The generation engine: one worker thread owns the model, and the requests that arrived while
it was busy run together as the next batch (up to `max_batch` rows of prompts × n), each row
with its own settings; a row that ends leaves the batch. Each request's text streams back to
its event loop as `Job` events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.onnx.runtime import OnnxLM, Row
from lmpipe.serve.limits import Admission, Lease, ServerLimits
from lmpipe.serve.text import TextStream

log = logging.getLogger("lmpipe.serve")


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


class Completer:
    """The model, its `Admission` (limits and queue slots), and a batching worker: requests that
    wait while the model is busy are run together as one batch (each row with its own sampling
    settings, seed and token budget), so 16 clients cost little more than one. Text side: stop
    strings and incremental decoding (`TextStream`)."""

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
        self.waiting: deque[Job] = deque()
        self.wake = threading.Condition()
        self.batches = 0  # batches run so far (for /health and tests)
        self.worker = threading.Thread(target=self._work, name="lmpipe-batcher", daemon=True)
        self.admission = Admission(
            self.limits, self.name, self.aliases, self.context, self.worker.is_alive
        )
        self.worker.start()

    @property
    def pending(self) -> int:
        return self.admission.in_use

    def status(self) -> dict[str, Any]:
        cap, in_use = self.limits.queue_limit, self.admission.in_use
        return {
            "model": self.name,
            "capacity": cap,
            "in_use": in_use,
            "free": cap - in_use,
            "waiting": len(self.waiting),
            "batches": self.batches,
            "worker_alive": self.worker.is_alive(),
        }

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
                    job.post(
                        "done",
                        {
                            "text": [texts[i].text for i in spans[j]],
                            "finish_reason": [reason[i] for i in spans[j]],
                            "completion_tokens": sum(counts[i] for i in spans[j]),
                        },
                    )
