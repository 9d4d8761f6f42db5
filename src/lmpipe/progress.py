"""Progress of a long loop, fit for a terminal and for a log file: a tqdm bar when stderr is a
terminal; otherwise a plain log line at least every `every_s` seconds (no carriage returns)."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("lmpipe.progress")

EVERY_S = 10.0
"""Seconds between progress lines in a log: a reader sees the stage is alive and how far
(`LMPIPE_PROGRESS_S` overrides it)."""


def every_s() -> float:
    raw = os.environ.get("LMPIPE_PROGRESS_S", "")
    try:
        return float(raw) if raw else EVERY_S
    except ValueError:
        return EVERY_S


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """`update(n, **fields)` after each unit of work; `close()` at the end. Silent when
    `enabled` is false (ranks other than 0)."""

    def __init__(
        self,
        total: int,
        desc: str,
        initial: int = 0,
        enabled: bool = True,
        every_s: float | None = None,
        terminal: bool | None = None,
    ) -> None:
        self.total, self.desc, self.done = total, desc, initial
        self.enabled = enabled
        self.every_s = every_s if every_s is not None else globals()["every_s"]()
        self.t0 = self.last = time.perf_counter()
        self.start = initial
        self.fields: dict[str, Any] = {}
        self.bar = None
        if enabled and (sys.stderr.isatty() if terminal is None else terminal):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc)

    def update(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.update(n)
            if fields:
                self.bar.set_postfix({k: str(v) for k, v in self.fields.items()})
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.t0
        rate = (self.done - self.start) / max(elapsed, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100 * self.done / max(self.total, 1)
        parts = [f"{self.desc} {self.done}/{self.total} ({pct:.0f}%)"]
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        parts.append(
            f"{_duration(elapsed)} elapsed" + (f", ~{_duration(left)} left" if left == left else "")
        )
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
