"""MLflow behind a thin wrapper: one run per stage execution, and a null tracker for tests.

Conventions (DESIGN.md): tracking URI from `MLFLOW_TRACKING_URI`, else `tracking.uri` (a relative
sqlite path is taken from the repo root, `DVC_ROOT` inside `dvc exp run`); run named after the
stage in `tracking.experiment`; params flattened; tags `lmpipe.stage`, `git.commit`,
`git.dirty`, `input.<name>.sha256`, `lmpipe.output.<sha256>` on the run that wrote an output
with that content, `lineage.<name>.run_id` (the last finished run that wrote an input's content:
lineage by content, as DVC tracks it, so it needs no run id inside the hashed outputs) and
`dvc.exp_name` inside a DVC experiment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmpipe.config import Params, TrackingParams
from lmpipe.io import git_state, hash_path

log = logging.getLogger(__name__)

OUTPUT_TAG = "lmpipe.output."
"""Prefix of the tag that marks a run as the writer of an output; the rest is its sha256."""


class TrackingError(RuntimeError):
    """The tracking backend cannot be used; the message says what to change."""


class NullTracker:
    """Records what would be logged, in memory. Used by unit tests and `tracking.enabled: false`."""

    run_id: str | None = None

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.tags: dict[str, str] = {}
        self.metrics: list[tuple[str, float, int | None]] = []
        self.artifacts: dict[str, Any] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.extend((k, float(v), step) for k, v in metrics.items())

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.artifacts[artifact_file] = obj

    def log_text(self, text: str, artifact_file: str) -> None:
        self.artifacts[artifact_file] = text

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts[str(Path(artifact_path or "") / Path(path).name)] = Path(path)

    def log_report(self, report: Mapping[str, Any], artifact_file: str) -> None:
        self.log_dict(dict(report), artifact_file)
        self.log_metrics(flatten_numeric(report, prefix="report/"))

    def log_artifacts(self, directory: str | Path, artifact_path: str) -> None:
        self.artifacts[artifact_path] = Path(directory)

    def log_outputs(self, outputs: Mapping[str, str | Path]) -> dict[str, str]:
        """Tag this run as the writer of each output's content (what later stages find it by)."""
        tags = {}
        for name, path in outputs.items():
            digest = hash_path(path)
            tags[f"output.{name}.sha256"] = digest
            tags[f"{OUTPUT_TAG}{digest}"] = str(path)
        self.set_tags(tags)
        return tags

    def log_pipeline_metrics(self, metrics: Mapping[str, float]) -> None:
        """Metrics for the pipeline run this stage runs under (the report card's headline
        figures, so the pipeline runs compare side by side in the MLflow UI); none outside DVC."""
        self.pipeline_metrics = dict(metrics)

    def note_model(
        self,
        path: str | Path,
        name: str,
        kind: str,
        registered_name: str | None = None,
        description: str | None = None,
    ) -> None:
        """Record a model logged to this run (`lmpipe.stage.log_model` logs it to MLflow)."""
        self.artifacts[f"model:{name}"] = (Path(path), kind, registered_name, description)

    def version_tags(self, tags: Mapping[str, str] | None = None) -> dict[str, str]:
        """The tags a registered model version of this run carries: the run's VERSION_TAGS,
        lineage and input/output hashes, then `tags`."""
        lineage = {k: v for k, v in self.tags.items() if k in VERSION_TAGS or
                   k.startswith(("lineage.", "input.", "output."))}  # fmt: skip
        return {**lineage, **{k: str(v) for k, v in (tags or {}).items()}}

    def tag_version(
        self, registered_name: str, version: str, tags: Mapping[str, str], description: str | None
    ) -> None:
        """Tag and describe a registered model version (no registry without MLflow)."""


class MlflowTracker(NullTracker):
    """Forwards to the active MLflow run (and keeps the in-memory record too)."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        import mlflow

        self._mlflow = mlflow
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        super().log_params(params)
        # MLflow caps a param value at 6000 characters.
        self._mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        super().set_tags(tags)
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        super().log_dict(obj, artifact_file)
        self._mlflow.log_dict(obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        super().log_text(text, artifact_file)
        self._mlflow.log_text(text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        super().log_artifact(path, artifact_path)
        self._mlflow.log_artifact(str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str) -> None:
        super().log_artifacts(directory, artifact_path)
        self._mlflow.log_artifacts(str(directory), artifact_path)

    def log_pipeline_metrics(self, metrics: Mapping[str, float]) -> None:
        super().log_pipeline_metrics(metrics)
        if parent := self.tags.get(PARENT_TAG):
            for k, v in metrics.items():
                self._mlflow.MlflowClient().log_metric(parent, k, float(v))

    def tag_version(
        self, registered_name: str, version: str, tags: Mapping[str, str], description: str | None
    ) -> None:
        client = self._mlflow.MlflowClient()
        for k, v in tags.items():
            client.set_model_version_tag(registered_name, version, k, v)
        if description:
            client.update_model_version(registered_name, version, description=description)


VERSION_TAGS = ("lmpipe.stage", "lmpipe.params.sha256", "git.commit", "git.dirty",
                "dvc.lock.sha256", "dvc.exp_name")  # fmt: skip
"""Run tags a registered version carries too (with the lineage and input/output hashes)."""


def model_card(stage: str, report: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A registered version's description: the stage and its headline figures from `report`
    (dotted keys into nested dicts; missing ones left out)."""
    figures = []
    for key in keys:
        value: Any = report
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            figures.append(f"{key} {value:.4g}")
    return f"lmpipe {stage} model" + (f": {', '.join(figures)}" if figures else "")


class RenamingTracker:
    """Forwards to another tracker, renaming metric keys (two trainings in one run)."""

    def __init__(self, inner: NullTracker, rename: Mapping[str, str]) -> None:
        self.inner, self.rename = inner, dict(rename)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.inner.log_metrics({self.rename.get(k, k): v for k, v in metrics.items()}, step)


def flatten_numeric(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as `{"prefix" + "a.b": value}` (bools and strings skipped)."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten_numeric(v, f"{prefix}{k}."))
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = float(obj)
    return out


def absolute_uri(uri: str, root: str | Path) -> str:
    """A relative `sqlite:///x.db` or plain path taken from `root`; other URIs unchanged."""
    root = Path(root).resolve()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(root / uri.removeprefix('sqlite:///')).as_posix()}"
    if "://" not in uri:
        return (root / uri).resolve().as_uri()
    return uri


def resolve_uri(cfg: TrackingParams, root: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` wins over `tracking.uri`; relative paths are taken from the project.

    The project is `DVC_ROOT` when DVC set it: `dvc exp run --temp` and `--queue` run the stages in
    a copy under .dvc/tmp/exps, and their runs belong in the project's store, not the copy's.
    """
    base = os.environ.get("DVC_ROOT") or root
    return absolute_uri(os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri, base)


def experiment_tags() -> dict[str, str]:
    """`dvc.exp_name` when the stage runs inside `dvc exp run` (DVC sets `DVC_EXP_NAME`): ties
    MLflow runs to the DVC experiment that made them (`lmpipe sweep` finds its trials by it)."""
    name = os.environ.get("DVC_EXP_NAME")
    return {"dvc.exp_name": name} if name else {}


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside an embedded sqlite store (not in the
    working dir of whichever process created it); the server's default otherwise."""
    if uri.startswith("sqlite:"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
    ("logged_models", "artifact_location"),
)
"""Where MLflow's sqlite store records absolute artifact locations (tables missing in older
MLflow versions are skipped)."""


def relocate_store(uri: str) -> list[str]:
    """Point an embedded store's artifact locations at the folder it now sits in.

    MLflow records absolute paths, so a copied, cloned or container-mounted project would read
    its artifacts from the original folder (or nowhere). lmpipe keeps them in `mlartifacts`
    beside the sqlite file (`artifact_location`); every experiment whose location is another
    folder's `mlartifacts` has that folder's prefix rewritten to this one, in every table that
    stores a location. Run by every stage before it logs and by `lmpipe relocate-mlflow`.
    Returns the old folders; a server store or a store already in place is left alone.
    """
    if not uri.startswith("sqlite:///"):
        return []
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file():
        return []
    import sqlite3
    from urllib.parse import unquote, urlparse

    here = db.resolve().parent
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con, con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "experiments" not in tables:
            return []
        old = set()
        for (loc,) in con.execute("SELECT artifact_location FROM experiments"):
            loc = loc or ""
            path = Path(unquote(urlparse(loc).path) if loc.startswith("file:") else loc)
            if path.name == "mlartifacts" and path.parent != here:
                old.add(path.parent)
        for base in old:
            for prefix, new in ((base.as_uri() + "/", here.as_uri() + "/"),
                                (base.as_posix() + "/", here.as_posix() + "/")):  # fmt: skip
                for table, column in ARTIFACT_COLUMNS:
                    if table in tables:
                        con.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE substr({column}, 1, ?) = ?",
                            (new, len(prefix) + 1, len(prefix), prefix),
                        )
    if old:
        log.info("MLflow store %s: artifact locations moved from %s", db,
                 ", ".join(map(str, sorted(old))))  # fmt: skip
    return [str(b) for b in sorted(old)]


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast with a clear message when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status >= 500:
                raise TrackingError(f"MLflow server {uri} answered {resp.status} at /health")
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}) after {timeout_s:g}s. "
            "Start the server, fix MLFLOW_TRACKING_URI / tracking.uri, or unset "
            "MLFLOW_TRACKING_URI to use the embedded store (sqlite:///mlflow.db)."
        ) from None


PIPELINE_KEY = "lmpipe.pipeline.key"
"""Tag of a pipeline run: which `dvc repro` / `dvc exp run` process it stands for."""

PARENT_TAG = "mlflow.parentRunId"
"""MLflow's own tag for nesting: the UI shows a stage run under the pipeline run it names."""


def _is_dvc(cmdline: list[str]) -> bool:
    """A `dvc` command line (the console script, `python -m dvc`, or DVC's queue worker)."""
    names = [Path(a).name for a in cmdline[:3]]
    return any(n in ("dvc", "dvc.exe") for n in names) or cmdline[1:3] == ["-m", "dvc"]


def pipeline_key(env: Mapping[str, str] = os.environ) -> str | None:
    """What identifies the pipeline run this stage belongs to: `LMPIPE_PIPELINE_RUN` when a
    wrapper sets it, else the DVC process that started this stage (host, pid, start time), so
    the stages one `dvc repro` runs share one key; None outside DVC (a stage run by hand)."""
    if explicit := env.get("LMPIPE_PIPELINE_RUN", "").strip():
        return explicit
    import socket

    import psutil

    try:
        proc = psutil.Process().parent()
        while proc is not None:
            with contextlib.suppress(psutil.AccessDenied, psutil.ZombieProcess):
                if _is_dvc(proc.cmdline()):
                    return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.3f}"
            proc = proc.parent()
    except psutil.NoSuchProcess:  # an ancestor exited while we looked
        return None
    return None


def pipeline_run(mlflow: Any, experiment_id: str, key: str, tags: Mapping[str, str]) -> str:
    """The id of the pipeline run for `key`: found by its tag, else created (RUNNING; each stage
    sets its status when it ends). It carries the commit and, in an experiment, its name."""
    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_KEY}` = '{key}'", max_results=1
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    keep = {k: v for k, v in tags.items() if k.startswith(("git.", "dvc."))}
    name = f"pipeline {keep['dvc.exp_name']}" if "dvc.exp_name" in keep else "pipeline"
    run = client.create_run(
        experiment_id, run_name=name,
        tags={PIPELINE_KEY: key, "lmpipe.stage": "pipeline", **keep},
    )  # fmt: skip
    return run.info.run_id


def link_reused(mlflow: Any, parent_id: str, tags: Mapping[str, str]) -> None:
    """Tag the pipeline run with `lmpipe.reused.<stage>` for each input written by a run outside
    it: a stage DVC did not rerun (its outputs were up to date or came from its cache)."""
    client = mlflow.MlflowClient()
    links = {}
    for key, run_id in tags.items():
        if key.startswith("lineage.") and key.endswith(".run_id"):
            writer = client.get_run(run_id).data.tags
            if writer.get(PARENT_TAG) != parent_id and "lmpipe.stage" in writer:
                links[f"lmpipe.reused.{writer['lmpipe.stage']}"] = run_id
    for k, v in links.items():
        client.set_tag(parent_id, k, v)


def params_digest(params: Params) -> str:
    """sha256 of the stage's params (tracking left out: it changes no result)."""
    import hashlib
    import json

    values = params.to_dict()
    values.pop("tracking", None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def lock_digest(root: str | Path) -> dict[str, str]:
    """`dvc.lock.sha256`: the pipeline's lock file as the stage started (what it ran against)."""
    path = Path(os.environ.get("DVC_ROOT") or root) / "dvc.lock"
    return {"dvc.lock.sha256": hash_path(path)} if path.is_file() else {}


def log_inputs(mlflow: Any, inputs: Mapping[str, str | Path], tags: Mapping[str, str]) -> None:
    """Each input as an MLflow dataset of the run (its path as given, relative to the project,
    and its content hash as digest; the context is the input's role), so the UI shows what
    every run read."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for name, path in inputs.items():
        digest = tags[f"input.{name}.sha256"][:DIGEST_CHARS]
        with warnings.catch_warnings():  # two registered local sources: the same class
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
            source = resolve_dataset_source(Path(path).as_posix())
        dataset = MetaDataset(source=source, name=Path(path).as_posix(), digest=digest)
        mlflow.log_input(dataset, context=name)


DIGEST_CHARS = 32
"""An MLflow dataset digest holds at most 36 characters; the run's tags keep the whole hash."""


def input_tags(inputs: Mapping[str, str | Path]) -> dict[str, str]:
    """The path and content hash of every input."""
    tags: dict[str, str] = {}
    for name, path in inputs.items():
        tags[f"input.{name}.path"] = str(path)
        tags[f"input.{name}.sha256"] = hash_path(path)
    return tags


def lineage_tags(mlflow: Any, tags: Mapping[str, str]) -> dict[str, str]:
    """`lineage.<name>.run_id`: the newest finished run tagged as the writer of each input's
    content (after a resumed or run-cache-restored stage, still the run that made those bytes)."""
    out = {}
    for key, digest in tags.items():
        if not (key.startswith("input.") and key.endswith(".sha256")):
            continue
        runs = mlflow.search_runs(
            search_all_experiments=True,
            filter_string=f"tags.`{OUTPUT_TAG}{digest}` LIKE '%' AND status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
            output_format="list",
        )
        if runs:
            out[f"lineage.{key.removeprefix('input.').removesuffix('.sha256')}.run_id"] = runs[
                0
            ].info.run_id
    return out


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    cfg: TrackingParams,
    inputs: Mapping[str, str | Path] | None = None,
    root: str | Path = ".",
) -> Iterator[NullTracker]:
    """Open one MLflow run for a stage execution; mark it FAILED if the body raises."""
    tags = {
        "lmpipe.stage": stage,
        "lmpipe.params.sha256": params_digest(params),
        **git_state(root),
        **lock_digest(root),
        **experiment_tags(),
        **input_tags(inputs or {}),
    }
    if not cfg.enabled:
        tracker = NullTracker()
        tracker.log_params(params.flat())
        tracker.set_tags(tags)
        yield tracker
        return

    uri = resolve_uri(cfg, root)
    check_reachable(uri, cfg.timeout_s)
    relocate_store(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(cfg.timeout_s)))
    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(cfg.experiment) is None:
            mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location(uri))
        mlflow.set_experiment(cfg.experiment)
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"cannot use MLflow at {uri}: {err}") from None

    parent = None
    try:
        tags.update(lineage_tags(mlflow, tags))
        if key := pipeline_key():
            experiment_id = mlflow.get_experiment_by_name(cfg.experiment).experiment_id
            parent = pipeline_run(mlflow, experiment_id, key, tags)
            tags[PARENT_TAG] = parent
            link_reused(mlflow, parent, tags)
    except mlflow.exceptions.MlflowException as err:  # lineage is a convenience, not a failure
        log.warning("could not look up the runs that wrote the inputs: %s", err)
    with mlflow.start_run(run_name=stage) as run:
        tracker = MlflowTracker(run.info.run_id)
        tracker.log_params(params.flat())
        tracker.set_tags(tags)
        log_inputs(mlflow, inputs or {}, tags)
        try:
            yield tracker
        except BaseException as err:
            tracker.set_tags({"lmpipe.error": f"{type(err).__name__}: {err}"[:5000]})
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            mlflow.end_run(status=status)
            if parent:
                mlflow.MlflowClient().set_terminated(parent, status=status)
            raise
    if parent:  # until the next stage of the same `dvc repro` starts
        mlflow.MlflowClient().set_terminated(parent, status="FINISHED")
