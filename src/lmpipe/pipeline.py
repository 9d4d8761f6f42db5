"""The stage graph of dvc.yaml, read as data: which stage writes a path, what runs before what."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def stage_outputs(stage: dict[str, Any]) -> list[str]:
    """Every path a stage writes: outs, metrics and plots."""
    paths: list[str] = []
    for kind in ("outs", "metrics", "plots"):
        for o in stage.get(kind, []) or []:
            paths += list(o) if isinstance(o, dict) else [o]
    return paths


def within(path: str, out: str) -> bool:
    """`path` is `out` or inside the folder `out`."""
    return path == out or path.startswith(out.rstrip("/") + "/")


def upstream(stages: dict[str, Any], targets: Iterable[str]) -> set[str]:
    """The targets and every stage whose outputs they (transitively) depend on."""
    seen: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in stages[name].get("deps", []) or []:
            todo += [s for s in stages if any(within(dep, o) for o in stage_outputs(stages[s]))]
    return seen


def producer(stages: dict[str, Any], path: str) -> str | None:
    """The stage that writes `path`, or None."""
    return next((s for s in stages if any(within(path, o) for o in stage_outputs(stages[s]))), None)
