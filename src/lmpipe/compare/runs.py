"""The runs `compare` reads: `RunRecord`, built from an MLflow run, and walking run lineage
(pure: it takes MLflow's run objects and never talks to MLflow).

A run's `lineage.*.run_id` tags name the runs that wrote its inputs; `with_upstream` adds their
params (recursively) to the run's own, so a pipeline result shows every stage's settings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

LINEAGE_TAG = re.compile(r"^lineage\.[^.]+\.run_id$")


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


def record_of(run) -> RunRecord:
    """The `RunRecord` of an MLflow run."""
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


def newest_first(runs: Iterable[RunRecord]) -> list[RunRecord]:
    """Runs by start time, newest first (runs without one last)."""
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(runs, key=lambda r: r.start_time or epoch, reverse=True)


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
