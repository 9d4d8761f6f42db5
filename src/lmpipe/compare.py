"""Compare pipeline runs recorded in MLflow: one row per run, the params that differ, headlines.

Without a stage, a row is a pipeline result: an evaluate run, with the params of every run
upstream of it (found through its `lineage.*.run_id` tags) and the report card's headline figures.

`fetch_runs` is the only function that talks to MLflow; the rest are pure and work on `RunRecord`.
MLflow is imported lazily, and nothing here creates an experiment or a store.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import logging
import os
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from lmpipe.config import ParamsError, TrackingParams, parse_section, read_yaml
from lmpipe.evaluate.report import HEADLINE
from lmpipe.tracking import TrackingError, absolute_uri, check_reachable

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "lmpipe"
FORMATS = ("table", "csv", "markdown")
REPORT_PREFIX = "report/"
GENERIC_METRICS = 6
"""Most headline columns shown when no stage is given and no `--metric`."""
TABLE_CELL_CHARS = 40
"""A longer param value is cut to this many characters in `table` output."""

STAGE_METRICS: dict[str, tuple[str, ...]] = {
    "pretrain": ("report/val_loss", "report/val_ppl", "report/tokens_per_sec"),
    "sft": ("report/val_loss", "report/val_ppl", "report/tokens_per_sec"),
    "reward": (
        "report/val_accuracy",
        "report/gold_order_accuracy",
        "report/val_gold_spearman",
    ),
    "rl": (
        "report/gold_reward.final",
        "report/proxy_reward.final",
        "report/kl_to_ref",
        "report/posterior_kl",
        "report/episodes_per_sec",
    ),
    "compress": (
        "report/variants.distilled.gold_reward",
        "report/variants.pruned.val_ppl",
        "report/variants.quantized.size_mb",
    ),
    "export": ("report/rl.max_abs_logit_diff", "report/rl.int8.greedy_token_match"),
    "evaluate": tuple(REPORT_PREFIX + path for _, path in HEADLINE),
}
"""Headline report metrics per stage, shown by default."""
METRIC_LABELS = {REPORT_PREFIX + path: name for name, path in HEADLINE}
"""Column titles for metrics with a short name (those of `reports/headline.json`)."""
_HEADLINE_PATHS = {name: REPORT_PREFIX + path for name, path in HEADLINE}
PIPELINE_STAGE = "evaluate"
"""The stage whose runs are the rows when no stage is given: one per pipeline result."""
LINEAGE_TAG = re.compile(r"^lineage\.[^.]+\.run_id$")

FIXED_COLUMNS = ("run", "stage", "start", "status", "commit")
_STAGE_RE = re.compile(r"^[\w.-]+$")
_SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")


class CompareError(RuntimeError):
    """A problem the user can fix (store, experiment, filter, format); the message says what."""


@dataclass(frozen=True)
class RunRecord:
    """What `compare` needs from one MLflow run."""

    run_id: str
    stage: str
    start_time: datetime | None
    status: str
    commit: str
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    lineage: tuple[str, ...] = ()
    """Run ids of the runs that wrote this run's inputs (its `lineage.*.run_id` tags)."""


@dataclass(frozen=True)
class Table:
    """Column headers and raw cells (`None` = missing); `metric_columns` are right-aligned."""

    headers: list[str]
    rows: list[list[str | float | None]]
    metric_columns: int = 0


# --- where the runs are ---------------------------------------------------------------------


def tracking_params(cwd: str | Path = ".") -> TrackingParams | None:
    """The `tracking` section of `params.yaml` in `cwd`, or `None` when there is no such file."""
    path = Path(cwd) / "params.yaml"
    if not path.exists():
        return None
    try:
        return parse_section("tracking", read_yaml(path).get("tracking"))
    except ParamsError as err:
        raise CompareError(f"cannot read the tracking section of {path}: {err}") from None


def resolve_tracking_uri(uri: str | None, cwd: str | Path = ".") -> str:
    """`uri`, else `MLFLOW_TRACKING_URI`, else `tracking.uri` of `./params.yaml`, else
    `sqlite:///mlflow.db`; a relative sqlite path or plain path is taken from `cwd`."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        cfg = tracking_params(cwd)
        uri = cfg.uri if cfg is not None else DEFAULT_URI
    return absolute_uri(uri, cwd)


def default_experiment(cwd: str | Path = ".") -> str:
    """`tracking.experiment` of `params.yaml` in `cwd` if there is one, else `lmpipe`."""
    cfg = tracking_params(cwd)
    return cfg.experiment if cfg is not None else DEFAULT_EXPERIMENT


def check_store(uri: str, timeout_s: float = 10.0) -> None:
    """Fail unless the store is there: an existing sqlite file or folder, or a live server."""
    if uri.startswith("sqlite:"):
        db = Path(uri.removeprefix("sqlite:///").split("?")[0])
        if not db.name or not db.is_file():
            raise CompareError(
                f"no MLflow database at {db} (tracking URI {uri}). Run the pipeline first, "
                "pass --tracking-uri, or set MLFLOW_TRACKING_URI."
            )
        _check_sqlite_tables(db)
    elif uri.startswith("file:"):
        folder = Path(unquote(urlparse(uri).path))
        if not folder.is_dir():
            raise CompareError(f"no MLflow file store at {folder} (tracking URI {uri})")
    elif uri.startswith(("http://", "https://")):
        try:
            check_reachable(uri, timeout_s)
        except TrackingError as err:
            raise CompareError(str(err)) from None


def _check_sqlite_tables(db: Path) -> None:
    """Refuse a file MLflow would initialize (empty, or another program's database)."""
    read_only = f"{db.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(read_only, uri=True)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as err:
        raise CompareError(f"{db} is not a readable SQLite database ({err})") from None
    if not {"experiments", "runs"} <= tables:
        raise CompareError(f"{db} is not an MLflow database (no experiments/runs tables)")


# --- reading MLflow -------------------------------------------------------------------------


def _record(run) -> RunRecord:
    tags = run.data.tags
    start = run.info.start_time
    return RunRecord(
        run_id=run.info.run_id,
        stage=tags.get("lmpipe.stage") or run.info.run_name or "",
        start_time=None if start is None else datetime.fromtimestamp(start / 1000, tz=UTC),
        status=run.info.status,
        commit=tags.get("git.commit", ""),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        lineage=tuple(v for k, v in sorted(tags.items()) if LINEAGE_TAG.match(k)),
    )


def fetch_runs(
    uri: str,
    experiment: str,
    stage: str | None = None,
    last: int = 10,
    timeout_s: float = 10.0,
    lineage: bool = False,
) -> list[RunRecord]:
    """The newest `last` runs of `experiment` (of `stage`, by tag or run name), newest first;
    with `lineage`, each with the params of the runs upstream of it added (`with_upstream`)."""
    if last < 1:
        raise CompareError(f"--last must be at least 1, got {last}")
    if stage is not None and not _STAGE_RE.match(stage):
        raise CompareError(f"bad stage name {stage!r}: letters, digits, '_', '.', '-' only")
    check_store(uri, timeout_s)
    for noisy in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise CompareError(
                f"no experiment {experiment!r} at {uri}; experiments there: "
                + (", ".join(names) or "none")
            )
        filters = [""] if stage is None else [
            f"tags.`lmpipe.stage` = '{stage}'",
            f"attributes.run_name = '{stage}'",
        ]  # fmt: skip
        found: dict[str, RunRecord] = {}
        for flt in filters:
            for run in client.search_runs(
                [exp.experiment_id], flt, max_results=last, order_by=["attributes.start_time DESC"]
            ):
                found.setdefault(run.info.run_id, _record(run))
        if not found:
            raise CompareError(_no_runs_message(client, exp.experiment_id, experiment, stage))
        runs = newest_first(found.values())[:last]
        if lineage:
            upstream = _fetch_upstream(client, runs)
            runs = [with_upstream(r, upstream) for r in runs]
    except MlflowException as err:
        raise CompareError(f"cannot read MLflow at {uri}: {err.message}") from None
    except SQLAlchemyError as err:
        raise CompareError(f"cannot read MLflow at {uri}: {err}") from None
    return runs


def _fetch_upstream(client, runs: Sequence[RunRecord]) -> dict[str, RunRecord]:
    """Every run reachable through the lineage of `runs`, by run id; ids MLflow no longer has
    (a deleted run) are skipped, so a row shows fewer params rather than failing."""
    from mlflow.exceptions import MlflowException

    found: dict[str, RunRecord] = {}
    todo = [i for r in runs for i in r.lineage]
    while todo:
        run_id = todo.pop()
        if run_id in found:
            continue
        try:
            found[run_id] = _record(client.get_run(run_id))
        except MlflowException:
            continue
        todo += found[run_id].lineage
    return found


def with_upstream(run: RunRecord, upstream: Mapping[str, RunRecord]) -> RunRecord:
    """`run` with the params of every run upstream of it (its lineage, followed recursively)
    added; the run's own value wins where both logged a key (e.g. `seed`)."""
    params = dict(run.params)
    seen: set[str] = set()
    todo = list(run.lineage)
    while todo:
        run_id = todo.pop(0)
        if run_id in seen or run_id not in upstream:
            continue
        seen.add(run_id)
        for k, v in upstream[run_id].params.items():
            params.setdefault(k, v)
        todo += upstream[run_id].lineage
    return replace(run, params=params)


def _no_runs_message(client, experiment_id: str, experiment: str, stage: str | None) -> str:
    if stage is None:
        return f"no runs in experiment {experiment!r}"
    runs = client.search_runs([experiment_id], "", max_results=1000)
    stages = sorted({_record(r).stage for r in runs} - {""})
    hint = ""
    if stage == PIPELINE_STAGE:
        hint = (
            f" (without --stage, compare shows pipeline results: the {PIPELINE_STAGE} stage's "
            "runs; pass --stage for another stage's runs)"
        )
    return (
        f"no runs of stage {stage!r} in experiment {experiment!r}; stages with runs: "
        + (", ".join(stages) or "none")
        + hint
    )


# --- building the table ---------------------------------------------------------------------


def newest_first(runs: Iterable[RunRecord]) -> list[RunRecord]:
    """Runs by start time, newest first (runs without one last)."""
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(runs, key=lambda r: r.start_time or epoch, reverse=True)


def _varies(key: str, runs: Sequence[RunRecord]) -> bool:
    if len({r.params[key] for r in runs if key in r.params}) > 1:
        return True
    # Logged by some runs of a stage but not others (a param added or removed between them).
    for stage in {r.stage for r in runs}:
        has = [key in r.params for r in runs if r.stage == stage]
        if any(has) and not all(has):
            return True
    return False


def varying_params(runs: Sequence[RunRecord]) -> list[str]:
    """Param keys whose values differ between `runs`, sorted."""
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if _varies(k, runs)]


def _present_metrics(runs: Sequence[RunRecord]) -> set[str]:
    return {k for r in runs for k in r.metrics}


def resolve_metric(key: str, runs: Sequence[RunRecord]) -> str:
    """`key` as given, or `report/<key>` when only that one was logged; a headline name
    (`rl_gold`) stands for its report path."""
    key = _HEADLINE_PATHS.get(key, key)
    present = _present_metrics(runs)
    if key not in present and REPORT_PREFIX + key in present:
        return REPORT_PREFIX + key
    return key


def missing_metrics(keys: Sequence[str], runs: Sequence[RunRecord]) -> list[str]:
    """One line per requested key that no run has, with near matches."""
    present = _present_metrics(runs)
    lines = []
    for key in keys:
        if resolve_metric(key, runs) not in present:
            near = difflib.get_close_matches(key, sorted(present), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            lines.append(f"no shown run has metric {key!r}{hint}")
    return lines


def headline_metrics(
    runs: Sequence[RunRecord], stage: str | None = None, requested: Sequence[str] = ()
) -> list[str]:
    """`requested` if any; else the stage's headlines that were logged; else a generic few."""
    if requested:
        return list(dict.fromkeys(resolve_metric(k, runs) for k in requested))
    present = _present_metrics(runs)
    if stage in STAGE_METRICS:
        return [k for k in STAGE_METRICS[stage] if k in present]
    stages = dict.fromkeys(r.stage for r in runs)
    known = [k for s in stages for k in STAGE_METRICS.get(s, ()) if k in present]
    if known:
        return list(dict.fromkeys(known))[:GENERIC_METRICS]
    return sorted(k for k in present if k.startswith(REPORT_PREFIX))[:GENERIC_METRICS]


def short_commit(commit: str) -> str:
    """First 7 hex digits of a git sha; anything else (`unknown`, empty) as is."""
    return commit[:7] if _SHA_RE.match(commit) else commit


def build_table(
    runs: Sequence[RunRecord],
    stage: str | None = None,
    all_params: bool = False,
    metrics: Sequence[str] = (),
) -> Table:
    """One row per run, newest first: fixed columns, params that differ, headline metrics."""
    runs = newest_first(runs)
    params = sorted({k for r in runs for k in r.params}) if all_params else varying_params(runs)
    keys = headline_metrics(runs, stage, metrics)
    titles = (METRIC_LABELS.get(k, k.removeprefix(REPORT_PREFIX)) for k in keys)
    headers = [*FIXED_COLUMNS, *params, *titles]
    rows: list[list[str | float | None]] = []
    for r in runs:
        start = r.start_time.astimezone().strftime("%Y-%m-%d %H:%M") if r.start_time else None
        fixed = [r.run_id[:8], r.stage, start, r.status, short_commit(r.commit) or None]
        rows.append(fixed + [r.params.get(k) for k in params] + [r.metrics.get(k) for k in keys])
    return Table(headers=headers, rows=rows, metric_columns=len(keys))


# --- rendering ------------------------------------------------------------------------------


def format_float(x: float) -> str:
    """4 significant digits; fixed notation (not `5.012e+04`) from 1e4 up to 1e15."""
    text = f"{x:.4g}"
    return f"{float(text):.0f}" if "e+" in text and abs(x) < 1e15 else text


def format_cell(value: str | float | None, missing: str = "-") -> str:
    """Floats with 4 significant digits, `None` as `missing`, strings as they are."""
    if value is None:
        return missing
    if isinstance(value, float):
        return format_float(value)
    return str(value)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_table(table: Table) -> str:
    """Aligned plain text for a terminal; metric columns right-aligned."""
    from tabulate import tabulate

    cells = [[_cut(format_cell(v), TABLE_CELL_CHARS) for v in row] for row in table.rows]
    n_text = len(table.headers) - table.metric_columns
    align = ["left"] * n_text + ["right"] * table.metric_columns
    return tabulate(
        cells, headers=table.headers, tablefmt="simple", disable_numparse=True, colalign=align
    )


def render_csv(table: Table) -> str:
    """CSV with a header row; missing values are empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.headers)
    writer.writerows([format_cell(v, missing="") for v in row] for row in table.rows)
    return buf.getvalue().rstrip("\n")


def render_markdown(table: Table) -> str:
    """A GitHub pipe table; metric columns right-aligned."""

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    n_text = len(table.headers) - table.metric_columns
    sep = ["---"] * n_text + ["---:"] * table.metric_columns
    out = [line(table.headers), "|" + "|".join(sep) + "|"]
    out += [line(format_cell(v) for v in row) for row in table.rows]
    return "\n".join(out)


def render(table: Table, fmt: str) -> str:
    """`table`, `csv` or `markdown` text (no trailing newline)."""
    renderers = {"table": render_table, "csv": render_csv, "markdown": render_markdown}
    if fmt not in renderers:
        raise CompareError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return renderers[fmt](table)


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
