"""What a sweep leaves behind: the trials table, the best trial and how to reproduce it, the
reward–KL figure, and the MLflow parent run that holds every trial's stage runs."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmpipe.sweep.executor import format_override
from lmpipe.sweep.plan import Spec
from lmpipe.sweep.run import INTERRUPTED, best_trial


def trial_rows(study, spec: Spec) -> list[dict[str, Any]]:
    """One row per trial that ran (interrupted attempts left out: they are run again)."""
    rows = []
    for t in study.trials:
        if t.user_attrs.get(INTERRUPTED) or t.state.name in ("WAITING", "RUNNING"):
            continue
        metrics = t.user_attrs.get("metrics", {})
        row: dict[str, Any] = {"trial": t.number, "experiment": t.user_attrs.get("exp_name", "")}
        for d in spec.dims:
            row[d.name] = t.params.get(d.name)
        row[spec.objective.key] = metrics.get(str(spec.objective))
        for c in spec.constraints:
            row[f"{c.metric.key} ({c.op} {c.bound:g})"] = metrics.get(str(c.metric))
        status = "complete" if t.state.name == "COMPLETE" else "failed"
        if status == "complete" and not t.user_attrs.get("feasible", True):
            status = "infeasible"
        row["status"] = status
        row["seconds"] = t.user_attrs.get("seconds")
        row["error"] = t.user_attrs.get("error", "")
        rows.append(row)
    return rows


def reproduce_command(trial) -> str:
    name = trial.user_attrs.get("exp_name", "")
    return f"dvc exp apply {name} && dvc repro"


def summary_text(study, spec: Spec, rows: Sequence[dict[str, Any]]) -> str:
    from tabulate import tabulate

    shown = [
        {k: _fmt(v) for k, v in r.items() if k != "error" or r["status"] == "failed"} for r in rows
    ]
    lines = [
        f"# Sweep {spec.name}",
        "",
        f"{spec.search} search over "
        + ", ".join(f"`{d.name}` {d.describe()}" for d in spec.dims)
        + f"; {spec.direction} `{spec.objective}`"
        + (
            f" subject to {', '.join(f'`{c}`' for c in spec.constraints)}"
            if spec.constraints
            else ""
        )
        + f"; stages run up to {', '.join(spec.targets)}.",
        "",
        tabulate(shown, headers="keys", tablefmt="github") if shown else "(no trials yet)",
        "",
    ]
    best = best_trial(study, spec)
    if best is None:
        lines.append("No complete trial meets the constraints yet.")
    else:
        params = ", ".join(f"{k}={format_override(v)}" for k, v in best.params.items())
        lines += [
            f"Best: trial {best.number} ({params}): {spec.objective.key} = {best.value:.4g}.",
            "",
            "Reproduce it (its params into the workspace, then the rest of the pipeline):",
            "",
            "```bash",
            reproduce_command(best),
            "```",
        ]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.4g}")
    if isinstance(v, str) and len(v) > 80:
        return v[:77] + "..."
    return v


def write_outputs(study, spec: Spec, out_dir: Path) -> dict[str, Path]:
    """trials.csv, summary.md and (when there is something to draw) frontier.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, spec)
    files = {"csv": out_dir / "trials.csv", "summary": out_dir / "summary.md"}
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        tmp = files["csv"].with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        tmp.replace(files["csv"])
    files["summary"].write_text(summary_text(study, spec, rows))
    fig = frontier_figure(study, spec, out_dir / "frontier.png")
    if fig is not None:
        files["figure"] = fig
    return files


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-left frontier: the points no other point beats with less x and more y."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def frontier_figure(study, spec: Spec, path: Path) -> Path | None:
    """Each y metric against x for every complete trial, grouped (e.g. by algorithm), with each
    group's frontier; points labelled with the values of the other swept params."""
    if spec.plot is None:
        return None
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_key = spec.plot.group
    others = [d.name for d in spec.dims if d.name != group_key]
    groups: dict[str, list] = {}
    for t in done:
        g = t.params.get(group_key) if group_key else None
        groups.setdefault(str(g) if g is not None else "all", []).append(t)
    x_ref = spec.plot.x
    fig, axes = plt.subplots(
        1, len(spec.plot.y), figsize=(5.2 * len(spec.plot.y), 4.2), squeeze=False
    )
    for ax, y_ref in zip(axes[0], spec.plot.y, strict=True):
        for gi, (g, trials) in enumerate(sorted(groups.items())):
            pts = []
            for t in trials:
                m = t.user_attrs.get("metrics", {})
                if str(x_ref) in m and str(y_ref) in m:
                    pts.append((m[str(x_ref)], m[str(y_ref)], t))
            if not pts:
                continue
            color = f"C{gi}"
            label = g if group_key and len(groups) > 1 else None
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=label, zorder=3)
            front = pareto([(p[0], p[1]) for p in pts])
            ax.plot([p[0] for p in front], [p[1] for p in front], color=color, alpha=0.6)
            for x, y, t in pts:
                text = ", ".join(f"{format_override(t.params[o])}" for o in others)
                if text:
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(x_ref.key)
        ax.set_ylabel(y_ref.key)
        ax.set_title(f"{y_ref.key} against {x_ref.key}", fontsize=10)
        ax.grid(alpha=0.3)
        if group_key and len(groups) > 1:
            ax.legend(title=group_key, fontsize=8)
    if others:
        fig.suptitle(f"sweep {spec.name}: points labelled by {', '.join(others)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class SweepTracking:
    """The MLflow parent run of a sweep: spec as params, each trial's objective as a metric,
    every stage run of every trial tagged as its child (found by the `dvc.exp_name` tag)."""

    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow import MlflowClient

        for noisy in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=uri)
        from lmpipe.tracking.store import artifact_location

        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location(uri))
        else:
            self.experiment_id = exp.experiment_id
        self.run_id: str | None = None

    def start(self, study, spec: Spec) -> str:
        run_id = study.user_attrs.get("mlflow_run_id")
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"sweep-{spec.name}",
                tags={"lmpipe.stage": "sweep", "lmpipe.sweep": spec.name},
            )
            run_id = run.info.run_id
            study.set_user_attr("mlflow_run_id", run_id)
            params = {
                "sweep.search": spec.search,
                "sweep.objective": str(spec.objective),
                "sweep.direction": spec.direction,
                "sweep.constraints": "; ".join(map(str, spec.constraints)) or "none",
                "sweep.targets": ",".join(spec.targets),
                "sweep.seed": spec.seed,
                **{f"space.{d.name}": d.describe() for d in spec.dims},
            }
            for k, v in params.items():
                self.client.log_param(run_id, k, str(v)[:6000])
        self.run_id = run_id
        return run_id

    def adopt(self, exp_name: str, trial_number: int, spec: Spec) -> list[str]:
        """Make one trial's pipeline runs (each `dvc exp run` of it; the stage runs are theirs)
        children of the sweep run, or its stage runs where no pipeline run grouped them; the
        stage names of its stage runs."""
        assert self.run_id
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.`dvc.exp_name` = '{exp_name}'", max_results=100
        )
        pipelines = [r for r in runs if r.data.tags.get("lmpipe.stage") == "pipeline"]
        stages = [r for r in runs if r.data.tags.get("lmpipe.stage") != "pipeline"]
        for r in pipelines or stages:
            for k, v in {
                "mlflow.parentRunId": self.run_id,
                "lmpipe.sweep": spec.name,
                "lmpipe.trial": str(trial_number),
            }.items():
                self.client.set_tag(r.info.run_id, k, v)
        return sorted(r.data.tags.get("lmpipe.stage", r.info.run_name) for r in stages)

    def close_interrupted(self, exp_name: str, trial_number: int, spec: Spec) -> None:
        """Stage runs a killed sweep left RUNNING: marked KILLED, kept under the sweep."""
        self.adopt(exp_name, trial_number, spec)
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`dvc.exp_name` = '{exp_name}' and attributes.status = 'RUNNING'",
        )
        for r in runs:
            self.client.set_terminated(r.info.run_id, status="KILLED")

    def log_trial(self, study, trial_number: int) -> None:
        assert self.run_id
        t = study.trials[trial_number]
        if t.state.name == "COMPLETE":
            self.client.log_metric(self.run_id, "trial/objective", t.value, step=trial_number)
        self.client.log_metric(
            self.run_id, "trial/failed", float(t.state.name == "FAIL"), step=trial_number
        )

    def finish(self, study, spec: Spec, files: dict[str, Path], status: str) -> None:
        assert self.run_id
        best = best_trial(study, spec)
        if best is not None:
            self.client.log_metric(self.run_id, "best/objective", best.value)
            self.client.set_tag(self.run_id, "best.trial", str(best.number))
            self.client.set_tag(self.run_id, "best.exp_name", best.user_attrs.get("exp_name", ""))
        for path in files.values():
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=status)
