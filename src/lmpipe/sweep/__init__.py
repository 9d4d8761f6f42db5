"""`lmpipe sweep SPEC.yaml`: grid, random or TPE search over params, one DVC experiment a trial.

Files of a sweep live in `sweeps/<name>/`: `study.db` (Optuna's storage, what makes a sweep
resumable), `trials.csv`, `summary.md`, `frontier.png` and one log per trial in `logs/`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmpipe.sweep.plan import Spec, SweepError
from lmpipe.sweep.spec import load_spec

__all__ = ["Spec", "SweepError", "load_spec", "sweep", "sweep_dir"]


def sweep_dir(root: Path, spec: Spec) -> Path:
    return root / "sweeps" / spec.name


def _tracking(root: Path, spec: Spec):
    """The sweep's MLflow parent run, in the store and experiment the stages use (or None)."""
    from lmpipe.config import ParamsError, load_params
    from lmpipe.sweep.report import SweepTracking
    from lmpipe.tracking.store import check_reachable, resolve_uri

    try:
        cfg = load_params(root / spec.params_file, ["tracking"]).tracking
    except ParamsError as err:
        raise SweepError(str(err)) from None
    if not cfg.enabled:
        return None
    uri = resolve_uri(cfg, root)
    check_reachable(uri, cfg.timeout_s)
    return SweepTracking(uri, cfg.experiment)


def _check_workspace(root: Path) -> None:
    import subprocess

    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if res.returncode != 0:
        raise SweepError(f"{root} is not a git repository with a commit; DVC experiments need one")
    if not (root / ".dvc").is_dir():
        raise SweepError(f"{root} is not a DVC project (no .dvc folder)")


def sweep(
    spec: Spec,
    root: Path,
    echo: Callable[[str], None] = print,
    executor=None,
) -> dict[str, Path]:
    """Run (or resume) a sweep to `spec.trials` trials; returns the files it wrote."""
    from lmpipe.sweep.executor import DvcExecutor
    from lmpipe.sweep.report import write_outputs
    from lmpipe.sweep.run import exclusive, open_study, run_sweep

    root = root.resolve()
    out = sweep_dir(root, spec)
    if executor is None:
        _check_workspace(root)
        executor = DvcExecutor(root, spec, out / "logs")
    with exclusive(out / ".lock"):
        study = open_study(spec, f"sqlite:///{out / 'study.db'}")
        tracking = _tracking(root, spec)
        if tracking is not None:
            run_id = tracking.start(study, spec)
            echo(f"sweep {spec.name}: MLflow parent run {run_id}")
            for t in study.trials:  # left running by a sweep that was killed
                if t.state.name == "RUNNING" and t.user_attrs.get("exp_name"):
                    tracking.close_interrupted(t.user_attrs["exp_name"], t.number, spec)

        def on_trial(study, request, state):
            if tracking is not None:
                stages = tracking.adopt(request.exp_name, request.number, spec)
                tracking.log_trial(study, request.number)
                if stages:
                    echo(f"trial {request.number}: stage runs {', '.join(stages)}")
            write_outputs(study, spec, out)

        status = "FINISHED"
        try:
            run_sweep(spec, study, executor, on_trial=on_trial, echo=echo)
        except BaseException:
            status = "KILLED"
            raise
        finally:
            files = write_outputs(study, spec, out)
            if tracking is not None:
                tracking.finish(study, spec, files, status)
    return files
