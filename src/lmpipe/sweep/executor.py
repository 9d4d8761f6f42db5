"""Trial execution: a trial's params as `dvc exp run -S` overrides, `DvcExecutor` running them
as DVC experiments, and reading a finished trial's metrics or the error it ended with."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpipe.sweep.plan import MetricRef, Spec, SweepError
from lmpipe.sweep.space import override_errors


@dataclass(frozen=True)
class TrialRequest:
    number: int
    exp_name: str
    overrides: dict[str, Any]


@dataclass
class TrialOutcome:
    values: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    exp_rev: str | None = None
    seconds: float = 0.0


Executor = Callable[[Sequence[TrialRequest]], list[TrialOutcome]]


def format_override(value: Any) -> str:
    """A value as `dvc exp run -S key=VALUE` reads it back to the same YAML type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:  # YAML 1.1 reads 1e-05 as a string
            mantissa, exp = text.split("e")
            text = f"{mantissa}.0e{exp}"
        return text
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value if value.replace("_", "").replace("-", "").isalnum() else json.dumps(value)
    return json.dumps(value)


def lookup(doc: Any, key: str) -> Any:
    """`a.b.c` in nested dicts; a key that itself has dots is found too."""
    if isinstance(doc, dict) and key in doc:
        return doc[key]
    head, _, rest = key.partition(".")
    while rest:
        if isinstance(doc, dict) and head in doc:
            found = lookup(doc[head], rest)
            if found is not None:
                return found
        nxt, _, rest = rest.partition(".")
        head = f"{head}.{nxt}"
    return doc.get(head) if isinstance(doc, dict) else None


def read_metrics(read_file: Callable[[str], str | None], refs: Sequence[MetricRef]) -> dict:
    """`{str(ref): float}` for every ref; raises SweepError naming what is missing."""
    docs: dict[str, Any] = {}
    out: dict[str, float] = {}
    for ref in refs:
        if ref.path not in docs:
            text = read_file(ref.path)
            if text is None:
                raise SweepError(f"the trial wrote no {ref.path}")
            try:
                docs[ref.path] = json.loads(text)
            except json.JSONDecodeError as err:
                raise SweepError(f"{ref.path} is not JSON: {err}") from None
        value = lookup(docs[ref.path], ref.key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            keys = ", ".join(list(docs[ref.path])[:20]) if isinstance(docs[ref.path], dict) else ""
            raise SweepError(f"{ref} is {value!r}, not a number (keys there: {keys})")
        out[str(ref)] = float(value)
    return out


class DvcExecutor:
    """Each trial is `dvc exp run --temp` (or queued and run N at a time when parallel): the
    workspace is left alone, unchanged upstream stages come from DVC's cache, and the trial's
    results are read from its experiment commit."""

    def __init__(self, root: Path, spec: Spec, log_dir: Path, dvc: str = "dvc") -> None:
        self.root, self.spec, self.log_dir, self.dvc = root, spec, log_dir, dvc
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _git(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True)

    def head(self) -> str:
        return self._git("rev-parse", "HEAD").stdout.strip()

    def exp_rev(self, name: str, baseline: str) -> str | None:
        """The commit of experiment `name` made on `baseline` (HEAD when the trial started:
        a commit made while the sweep runs does not lose the trial's results)."""
        ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
        res = self._git("rev-parse", "--verify", "--quiet", ref)
        return res.stdout.strip() or None

    def _read_at(self, rev: str) -> Callable[[str], str | None]:
        def read(path: str) -> str | None:
            res = self._git("show", f"{rev}:{path}")
            return res.stdout if res.returncode == 0 else None

        return read

    def _set_args(self, req: TrialRequest) -> list[str]:
        args = ["--name", req.exp_name]
        for key, value in req.overrides.items():
            args += ["-S", f"{self.spec.params_file}:{key}={format_override(value)}"]
        return args

    def _collect(
        self, req: TrialRequest, log_file: Path, rc: int, t0: float, baseline: str
    ) -> TrialOutcome:
        seconds = time.monotonic() - t0
        rev = self.exp_rev(req.exp_name, baseline)
        if rc != 0 or rev is None:
            return TrialOutcome(error=_error_tail(log_file, rc), seconds=seconds)
        try:
            values = read_metrics(self._read_at(rev), self.spec.metric_refs())
        except SweepError as err:
            return TrialOutcome(error=str(err), exp_rev=rev, seconds=seconds)
        return TrialOutcome(values=values, exp_rev=rev, seconds=seconds)

    def __call__(self, requests: Sequence[TrialRequest]) -> list[TrialOutcome]:
        invalid = {
            r.number: check_overrides(self.root / self.spec.params_file, r.overrides)
            for r in requests
        }
        runnable = [r for r in requests if invalid[r.number] is None]
        done = {o_req.number: o for o_req, o in zip(runnable, self._run(runnable), strict=True)}
        return [done.get(r.number) or TrialOutcome(error=invalid[r.number]) for r in requests]

    def _run(self, requests: Sequence[TrialRequest]) -> list[TrialOutcome]:
        if not requests:
            return []
        baseline = self.head()
        if len(requests) == 1:
            req = requests[0]
            log_file = self.log_dir / f"trial-{req.number}.log"
            cmd = [self.dvc, "exp", "run", "--temp", *self._set_args(req), *self.spec.targets]
            t0 = time.monotonic()
            with log_file.open("w") as fh:
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                res = subprocess.run(cmd, cwd=self.root, stdout=fh, stderr=subprocess.STDOUT)
            rc = res.returncode
            return [self._collect(req, log_file, rc, t0, baseline)]
        # several at once: DVC's queue runs them in temp dirs, `parallel` at a time
        t0 = time.monotonic()
        batch_log = self.log_dir / f"batch-{requests[0].number}.log"
        with batch_log.open("w") as fh:
            for req in requests:
                cmd = [self.dvc, "exp", "run", "--queue", *self._set_args(req), *self.spec.targets]
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                subprocess.run(cmd, cwd=self.root, stdout=fh, stderr=subprocess.STDOUT, check=False)
            cmd = [self.dvc, "exp", "run", "--run-all", "--jobs", str(len(requests))]
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            subprocess.run(cmd, cwd=self.root, stdout=fh, stderr=subprocess.STDOUT, check=False)
        outcomes = []
        for req in requests:
            log_file = self.log_dir / f"trial-{req.number}.log"
            logs = subprocess.run(
                [self.dvc, "queue", "logs", req.exp_name],
                cwd=self.root,
                capture_output=True,
                text=True,
            )
            log_file.write_text(logs.stdout + logs.stderr)
            rc = 0 if self.exp_rev(req.exp_name, baseline) else 1
            outcomes.append(self._collect(req, log_file, rc, t0, baseline))
        return outcomes


_STAGE_ERROR = re.compile(r"^[\w-]+: error: ")
_PY_ERROR = re.compile(r"^\w+(\.\w+)*(Error|Exception|Interrupt): ")


def error_summary(text: str, rc: int, lines: int = 8) -> str:
    """What a failed trial's log says went wrong: the stage's own `stage: error:` message (and
    the lines that follow it), else a Python exception line, else DVC's errors, else the tail."""
    rows = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(rows) if _STAGE_ERROR.match(ln)), None)
    if start is not None:
        picked = []
        for ln in rows[start : start + lines]:
            if ln.startswith("ERROR:"):
                break
            picked.append(ln)
    else:
        py = [ln for ln in rows if _PY_ERROR.match(ln)]
        dvc = list(dict.fromkeys(ln for ln in rows if ln.startswith("ERROR:")))
        picked = py[-1:] or dvc[-2:] or rows[-lines:]
    return f"exit {rc}: " + " | ".join(ln.strip() for ln in picked)[-2000:]


def _error_tail(log_file: Path, rc: int) -> str:
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    return error_summary(text, rc)


def check_overrides(params_file: Path, overrides: dict[str, Any]) -> str | None:
    """The params a trial would run with, validated as the stages will: an error or None.
    Catches combinations no single value shows (e.g. rloo with one sample per prompt)."""
    from lmpipe.config import read_yaml

    errors = override_errors(read_yaml(params_file), overrides)
    return ("invalid params: " + "; ".join(errors)) if errors else None
