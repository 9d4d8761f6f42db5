"""Compare pipeline runs recorded in MLflow: one row per run, the params that differ, headlines.

Without a stage, a row is a pipeline result: an evaluate run, with the params of every run
upstream of it (found through its `lineage.*.run_id` tags) and the report card's headline figures.

`runs` holds `RunRecord` and lineage walking, `store` finds and reads the MLflow store (the only
module that talks to MLflow), `table` builds and renders the comparison table (pure).
"""

from __future__ import annotations

from collections.abc import Sequence

from lmpipe.compare.runs import CompareError, RunRecord, with_upstream
from lmpipe.compare.store import (
    PIPELINE_STAGE,
    default_experiment,
    fetch_runs,
    resolve_tracking_uri,
    tracking_params,
)
from lmpipe.compare.table import build_table, format_float, missing_metrics, render, varying_params

__all__ = [
    "CompareError",
    "RunRecord",
    "build_table",
    "compare_runs",
    "fetch_runs",
    "format_float",
    "render",
    "resolve_tracking_uri",
    "varying_params",
    "with_upstream",
]


def compare_runs(
    stage: str | None,
    experiment: str | None,
    last: int,
    fmt: str,
    tracking_uri: str | None,
    all_params: bool,
    metrics: Sequence[str],
) -> tuple[str, list[str]]:
    """`lmpipe compare`: the newest `last` runs of `stage` (None: pipeline results, each an
    evaluate run with its upstream stages' params) rendered as `fmt`, and a warning for each of
    `metrics` that no run has."""
    uri = resolve_tracking_uri(tracking_uri)
    cfg = tracking_params()
    # a pipeline result's params are spread over its stages' runs: gather them by lineage
    runs = fetch_runs(
        uri,
        experiment or default_experiment(),
        stage=stage or PIPELINE_STAGE,
        last=last,
        timeout_s=cfg.timeout_s if cfg is not None else 10.0,
        lineage=stage is None,
    )
    table = build_table(runs, stage=stage or PIPELINE_STAGE, all_params=all_params, metrics=metrics)
    return render(table, fmt), missing_metrics(metrics, runs)
