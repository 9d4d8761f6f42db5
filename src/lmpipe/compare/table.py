"""The comparison table: one row per run, the params that differ, headline metrics; and its
text forms (an aligned terminal table, CSV, Markdown). Pure: works on `RunRecord`s only."""

from __future__ import annotations

import csv
import difflib
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lmpipe.compare.runs import CompareError, RunRecord, newest_first
from lmpipe.evaluate.report import HEADLINE

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
FIXED_COLUMNS = ("run", "stage", "start", "status", "commit")
_SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")


@dataclass(frozen=True)
class Table:
    """Column headers and raw cells (`None` = missing); `metric_columns` are right-aligned."""

    headers: list[str]
    rows: list[list[str | float | None]]
    metric_columns: int = 0


# --- building the table ---------------------------------------------------------------------


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
