"""What a stage logs through: an in-memory `NullTracker` (tests, `tracking.enabled: false`), the
`MlflowTracker` that also forwards to the active MLflow run, and a `RenamingTracker`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmpipe.io import hash_path
from lmpipe.tracking.report import flatten_numeric

OUTPUT_TAG = "lmpipe.output."
"""Prefix of the tag that marks a run as the writer of an output; the rest is its sha256."""
PARENT_TAG = "mlflow.parentRunId"
"""MLflow's own tag for nesting: the UI shows a stage run under the pipeline run it names."""


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
        lineage = {
            k: v
            for k, v in self.tags.items()
            if k in VERSION_TAGS or k.startswith(("lineage.", "input.", "output."))
        }
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


VERSION_TAGS = (
    "lmpipe.stage",
    "lmpipe.params.sha256",
    "git.commit",
    "git.dirty",
    "dvc.lock.sha256",
    "dvc.exp_name",
)
"""Run tags a registered version carries too (with the lineage and input/output hashes)."""


class RenamingTracker:
    """Forwards to another tracker, renaming metric keys (two trainings in one run)."""

    def __init__(self, inner: NullTracker, rename: Mapping[str, str]) -> None:
        self.inner, self.rename = inner, dict(rename)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.inner.log_metrics({self.rename.get(k, k): v for k, v in metrics.items()}, step)
