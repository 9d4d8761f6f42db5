"""Where the runs are and reading them: the tracking URI and experiment, and MLflow queries.

The only module of `compare` that talks to MLflow; MLflow is imported lazily, and nothing here
creates an experiment or a store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from lmpipe.compare.runs import CompareError, RunRecord, newest_first, record_of, with_upstream
from lmpipe.config import ParamsError, TrackingParams, parse_section, read_yaml
from lmpipe.tracking.store import absolute_uri, check_reachable
from lmpipe.tracking.tracker import TrackingError

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "lmpipe"
PIPELINE_STAGE = "evaluate"
"""The stage whose runs are the rows when no stage is given: one per pipeline result."""
_STAGE_RE = re.compile(r"^[\w.-]+$")


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
        filters = (
            [""]
            if stage is None
            else [
                f"tags.`lmpipe.stage` = '{stage}'",
                f"attributes.run_name = '{stage}'",
            ]
        )
        found: dict[str, RunRecord] = {}
        for flt in filters:
            for run in client.search_runs(
                [exp.experiment_id], flt, max_results=last, order_by=["attributes.start_time DESC"]
            ):
                found.setdefault(run.info.run_id, record_of(run))
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
            found[run_id] = record_of(client.get_run(run_id))
        except MlflowException:
            continue
        todo += found[run_id].lineage
    return found


def _no_runs_message(client, experiment_id: str, experiment: str, stage: str | None) -> str:
    if stage is None:
        return f"no runs in experiment {experiment!r}"
    runs = client.search_runs([experiment_id], "", max_results=1000)
    stages = sorted({record_of(r).stage for r in runs} - {""})
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
