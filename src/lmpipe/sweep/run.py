"""Run a sweep: Optuna proposes, DVC experiments execute, MLflow groups the trials' stage runs.

The loop (`run_sweep`) takes the executor as an argument, so its bookkeeping — failed trials,
resume after a kill, constraints, the grid — is tested without DVC; `DvcExecutor` (in
`lmpipe.sweep.executor`) is the real one. The Optuna study is kept in sqlite, one process a sweep.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmpipe.sweep.executor import Executor, TrialOutcome, TrialRequest, format_override
from lmpipe.sweep.plan import Spec, SweepError

INTERRUPTED = "interrupted"
"""User attr of a trial cut short by a kill or Ctrl-C: it is run again on resume, not counted."""


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
        storage=storage,
        study_name=spec.name,
        direction=spec.direction,
        sampler=make_sampler(spec),
        load_if_exists=True,
    )
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
    trial.set_user_attr(
        "feasible", all(c.holds(outcome.values[str(c.metric)]) for c in spec.constraints)
    )
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
        echo(
            f"sweep {spec.name}: resuming with {done} of {spec.trials} trials done"
            + (f", {resumed} interrupted trial(s) to run again" if resumed else "")
        )
    while done < spec.trials:
        batch = [study.ask(dists) for _ in range(min(spec.parallel, spec.trials - done))]
        requests = [
            TrialRequest(t.number, f"{spec.name}-{t.number}", dict(t.params)) for t in batch
        ]
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
                echo(
                    f"trial {t.number}: {spec.objective.key} = "
                    f"{o.values[str(spec.objective)]:.4g} ({o.seconds:.0f} s)"
                )
            else:
                error = study.trials[t.number].user_attrs.get("error", "")
                echo(f"trial {t.number}: FAILED ({o.seconds:.0f} s): {error}")
            if on_trial is not None:
                on_trial(study, r, state)


def best_trial(study, spec: Spec):
    """The best complete trial that meets every constraint, or None."""
    from optuna.trial import TrialState

    ok = [
        t
        for t in study.trials
        if t.state == TrialState.COMPLETE and t.user_attrs.get("feasible", True)
    ]
    if not ok:
        return None
    pick = max if spec.direction == "maximize" else min
    return pick(ok, key=lambda t: t.value)
