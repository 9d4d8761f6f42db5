"""Compare pipeline runs recorded in MLflow: one row per run, the params that differ, headlines.

Without a stage, a row is a pipeline result: an evaluate run, with the params of every run
upstream of it (found through its `lineage.*.run_id` tags) and the report card's headline figures.

`runs` holds `RunRecord` and lineage walking, `store` finds and reads the MLflow store (the only
module that talks to MLflow), `table` builds and renders the comparison table.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmpipe.compare.runs import (
    LINEAGE_TAG,
    CompareError,
    RunRecord,
    fetch_upstream,
    newest_first,
    record_of,
    with_upstream,
)
from lmpipe.compare.store import (
    DEFAULT_EXPERIMENT,
    DEFAULT_URI,
    PIPELINE_STAGE,
    check_store,
    default_experiment,
    fetch_runs,
    resolve_tracking_uri,
    tracking_params,
)
from lmpipe.compare.table import (
    FORMATS,
    METRIC_LABELS,
    STAGE_METRICS,
    Table,
    build_table,
    format_cell,
    format_float,
    headline_metrics,
    missing_metrics,
    render,
    resolve_metric,
    varying_params,
)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_URI",
    "FORMATS",
    "LINEAGE_TAG",
    "METRIC_LABELS",
    "PIPELINE_STAGE",
    "STAGE_METRICS",
    "CompareError",
    "RunRecord",
    "Table",
    "build_table",
    "check_store",
    "compare_runs",
    "default_experiment",
    "fetch_runs",
    "fetch_upstream",
    "format_cell",
    "format_float",
    "headline_metrics",
    "missing_metrics",
    "newest_first",
    "record_of",
    "render",
    "resolve_metric",
    "resolve_tracking_uri",
    "tracking_params",
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
