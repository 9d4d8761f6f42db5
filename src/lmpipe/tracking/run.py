"""`stage_run`: the MLflow run of one stage execution, with its tags (stage, params hash, git
and DVC state, input hashes), the runs that wrote its inputs, and the pipeline run it nests under.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lmpipe.config import Params, TrackingParams
from lmpipe.io import git_state, hash_path
from lmpipe.tracking.store import artifact_location, check_reachable, relocate_store, resolve_uri
from lmpipe.tracking.tracker import (
    OUTPUT_TAG,
    PARENT_TAG,
    MlflowTracker,
    NullTracker,
    TrackingError,
)

log = logging.getLogger(__name__)


PIPELINE_KEY = "lmpipe.pipeline.key"
"""Tag of a pipeline run: which `dvc repro` / `dvc exp run` process it stands for."""


def experiment_tags() -> dict[str, str]:
    """`dvc.exp_name` when the stage runs inside `dvc exp run` (DVC sets `DVC_EXP_NAME`): ties
    MLflow runs to the DVC experiment that made them (`lmpipe sweep` finds its trials by it)."""
    name = os.environ.get("DVC_EXP_NAME")
    return {"dvc.exp_name": name} if name else {}


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
        experiment_id,
        run_name=name,
        tags={PIPELINE_KEY: key, "lmpipe.stage": "pipeline", **keep},
    )
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
