"""Run a sweep: Optuna proposes, DVC experiments execute, MLflow groups the trials' stage runs.

The loop (`run_sweep`) takes the executor as an argument, so its bookkeeping — failed trials,
resume after a kill, constraints, the grid — is tested without DVC; `DvcExecutor` is the real one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpipe.sweep.spec import MetricRef, Spec, SweepError, override_errors

INTERRUPTED = "interrupted"
"""User attr of a trial cut short by a kill or Ctrl-C: it is run again on resume, not counted."""


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
        invalid = {r.number: check_overrides(self.root / self.spec.params_file, r.overrides)
                   for r in requests}  # fmt: skip
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
            logs = subprocess.run([self.dvc, "queue", "logs", req.exp_name], cwd=self.root,
                                  capture_output=True, text=True)  # fmt: skip
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


# --- the loop -------------------------------------------------------------------------------


def distributions(spec: Spec) -> dict[str, Any]:
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for d in spec.dims:
        if d.kind == "choice":
            out[d.name] = od.CategoricalDistribution(list(d.choices))
        elif d.kind in ("uniform", "loguniform"):
            out[d.name] = od.FloatDistribution(d.low, d.high, log=d.kind == "loguniform")
        else:
            out[d.name] = od.IntDistribution(int(d.low), int(d.high), log=d.kind == "logint")
    return out


def make_sampler(spec: Spec):
    import optuna

    if spec.search == "tpe":
        n = len(spec.constraints)
        constraints = (lambda t: t.user_attrs.get("constraints", [1.0] * n)) if n else None
        return optuna.samplers.TPESampler(
            seed=spec.seed,
            n_startup_trials=max(2, min(10, spec.trials // 3)),
            constant_liar=spec.parallel > 1,
            constraints_func=constraints,
        )
    return optuna.samplers.RandomSampler(seed=spec.seed)  # grid: every trial is enqueued


def open_study(spec: Spec, storage: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage, study_name=spec.name, direction=spec.direction,
        sampler=make_sampler(spec), load_if_exists=True,
    )  # fmt: skip
    fp = study.user_attrs.get("fingerprint")
    if fp is None:
        study.set_user_attr("fingerprint", spec.fingerprint())
    elif fp != spec.fingerprint():
        raise SweepError(
            f"sweep {spec.name!r} already exists in {storage} with another search space, "
            "objective or targets. Give this spec a new name, or delete the old sweep's folder "
            "to start it again"
        )
    return study


def counted(trial) -> bool:
    """Finished trials that count toward `trials`: complete, or failed on their own."""
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.FAIL and not trial.user_attrs.get(INTERRUPTED)


def _interrupt(study, trial_number: int, params: dict[str, Any], why: str) -> None:
    """Close a trial that did not finish and put its params back in front of the queue."""
    import optuna
    from optuna.trial import TrialState

    trial = study.trials[trial_number]
    if trial.state != TrialState.RUNNING:
        return
    handle = optuna.trial.Trial(study, trial._trial_id)
    handle.set_user_attr(INTERRUPTED, True)
    handle.set_user_attr("error", why)
    study.tell(trial_number, state=TrialState.FAIL)
    study.enqueue_trial(params, skip_if_exists=False)


def recover(study, spec: Spec) -> int:
    """Trials left RUNNING by a killed sweep are run again; grid points not yet tried queued."""
    from optuna.trial import TrialState

    stale = [t for t in study.trials if t.state == TrialState.RUNNING]
    for t in stale:
        _interrupt(study, t.number, t.params, "the sweep was stopped while this trial ran")
    if spec.search == "grid":
        key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
        have = {key(t.params) for t in study.trials if counted(t)}
        have |= {key(t.params) for t in study.trials if t.state == TrialState.WAITING}
        for point in spec.grid():
            if key(point) not in have:
                study.enqueue_trial(point)
    return len(stale)


def tell(study, spec: Spec, trial, outcome: TrialOutcome) -> str:
    """Record one outcome; returns 'complete' or 'failed'."""
    from optuna.trial import TrialState

    trial.set_user_attr("seconds", round(outcome.seconds, 1))
    if outcome.exp_rev:
        trial.set_user_attr("exp_rev", outcome.exp_rev)
    error = outcome.error
    value = outcome.values.get(str(spec.objective)) if error is None else None
    if error is None and (value is None or not math.isfinite(value)):
        error = f"objective {spec.objective} is {value}"
    if error is not None:
        trial.set_user_attr("error", error)
        if outcome.values:
            trial.set_user_attr("metrics", outcome.values)
        study.tell(trial, state=TrialState.FAIL)
        return "failed"
    trial.set_user_attr("metrics", outcome.values)
    violations = [c.violation(outcome.values[str(c.metric)]) for c in spec.constraints]
    trial.set_user_attr("constraints", violations)
    trial.set_user_attr("feasible", all(
        c.holds(outcome.values[str(c.metric)]) for c in spec.constraints))  # fmt: skip
    study.tell(trial, value)
    return "complete"


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """One process per sweep: a second `lmpipe sweep` of the same spec fails at once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"sweep is already running (lock {lock_path} is held)") from None
        fh.write(str(os.getpid()))
        fh.flush()
        yield


def run_sweep(
    spec: Spec,
    study,
    execute: Executor,
    on_trial: Callable[[Any, TrialRequest, str], None] | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Ask, execute and tell until `spec.trials` trials counted; resumable at any point."""
    dists = distributions(spec)
    resumed = recover(study, spec)
    done = sum(counted(t) for t in study.trials)
    if done or resumed:
        echo(f"sweep {spec.name}: resuming with {done} of {spec.trials} trials done"
             + (f", {resumed} interrupted trial(s) to run again" if resumed else ""))  # fmt: skip
    while done < spec.trials:
        batch = [study.ask(dists) for _ in range(min(spec.parallel, spec.trials - done))]
        requests = [TrialRequest(t.number, f"{spec.name}-{t.number}", dict(t.params))
                    for t in batch]  # fmt: skip
        for t, r in zip(batch, requests, strict=True):
            t.set_user_attr("exp_name", r.exp_name)
            shown = ", ".join(f"{k}={format_override(v)}" for k, v in r.overrides.items())
            echo(f"trial {t.number} ({r.exp_name}): {shown}")
        try:
            outcomes = execute(requests)
        except BaseException:
            for t, r in zip(batch, requests, strict=True):
                _interrupt(study, t.number, r.overrides, "the sweep was stopped while it ran")
            raise
        for t, r, o in zip(batch, requests, outcomes, strict=True):
            state = tell(study, spec, t, o)
            done += 1
            if state == "complete":
                echo(f"trial {t.number}: {spec.objective.key} = "
                     f"{o.values[str(spec.objective)]:.4g} ({o.seconds:.0f} s)")  # fmt: skip
            else:
                error = study.trials[t.number].user_attrs.get("error", "")
                echo(f"trial {t.number}: FAILED ({o.seconds:.0f} s): {error}")
            if on_trial is not None:
                on_trial(study, r, state)


def best_trial(study, spec: Spec):
    """The best complete trial that meets every constraint, or None."""
    from optuna.trial import TrialState

    ok = [t for t in study.trials
          if t.state == TrialState.COMPLETE and t.user_attrs.get("feasible", True)]  # fmt: skip
    if not ok:
        return None
    pick = max if spec.direction == "maximize" else min
    return pick(ok, key=lambda t: t.value)
