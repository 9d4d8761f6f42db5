"""A validated sweep (`Spec`) and its parts: swept dimensions, metric references, constraints,
the figure; and what running it means: the grid, the plan's lines, the resume fingerprint."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, replace
from typing import Any, Literal


class SweepError(ValueError):
    """A spec or project state that cannot be swept; the message says what to fix."""


@dataclass(frozen=True)
class Dim:
    """One swept parameter: a list of choices or a numeric range."""

    name: str
    kind: Literal["choice", "uniform", "loguniform", "int", "logint"]
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0

    @property
    def section(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def key(self) -> str:
        return self.name.split(".", 1)[1]

    def describe(self) -> str:
        if self.kind == "choice":
            return json.dumps(list(self.choices))
        return f"{self.kind}({self.low:g}, {self.high:g})"


@dataclass(frozen=True)
class MetricRef:
    """`reports/rl.json:gold_reward.final`: a key (dotted for nesting) of a JSON file."""

    path: str
    key: str

    def __str__(self) -> str:
        return f"{self.path}:{self.key}"


@dataclass(frozen=True)
class Constraint:
    """`metric op bound`, feasible when true; as a number for Optuna, feasible when <= 0."""

    metric: MetricRef
    op: Literal["<=", ">=", "<", ">"]
    bound: float

    def violation(self, value: float) -> float:
        return value - self.bound if self.op in ("<=", "<") else self.bound - value

    def holds(self, value: float) -> bool:
        return {
            "<=": value <= self.bound,
            "<": value < self.bound,
            ">=": value >= self.bound,
            ">": value > self.bound,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


@dataclass(frozen=True)
class Plot:
    x: MetricRef
    y: tuple[MetricRef, ...]
    group: str | None


@dataclass(frozen=True)
class Spec:
    """A validated sweep."""

    name: str
    dims: tuple[Dim, ...]
    search: Literal["grid", "random", "tpe"]
    trials: int
    parallel: int
    seed: int
    objective: MetricRef
    direction: Literal["maximize", "minimize"]
    constraints: tuple[Constraint, ...]
    targets: tuple[str, ...]
    params_file: str
    plot: Plot | None

    def metric_refs(self) -> list[MetricRef]:
        """Every metric a trial must report: objective, constraints, figure axes."""
        refs = [self.objective, *(c.metric for c in self.constraints)]
        if self.plot:
            refs += [self.plot.x, *self.plot.y]
        return list(dict.fromkeys(refs))

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of choices (grid search), in spec order."""
        names = [d.name for d in self.dims]
        return [
            dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(d.choices for d in self.dims))
        ]

    def with_trials(self, trials: int) -> Spec:
        """This sweep with `trials` trials (a grid has at most one per combination)."""
        n = trials if self.search != "grid" else min(trials, len(self.grid()))
        return replace(self, trials=n)

    def describe(self) -> list[str]:
        """What running this sweep does, one line each: the search, then each dimension."""
        head = (
            f"sweep {self.name}: {self.search}, {self.trials} trials, {self.parallel} at a time; "
            f"{self.direction} {self.objective}; each trial runs `dvc exp run` up to "
            f"{', '.join(self.targets)}"
        )
        return [head, *(f"  {d.name}: {d.describe()}" for d in self.dims)]

    def fingerprint(self) -> str:
        """What must not change for a sweep to resume: the space, search, objective, targets.
        The number of trials and the parallelism may change (e.g. to extend a finished sweep)."""
        doc = {
            "dims": [(d.name, d.kind, list(d.choices), d.low, d.high) for d in self.dims],
            "search": self.search,
            "seed": self.seed,
            "objective": [str(self.objective), self.direction],
            "constraints": [str(c) for c in self.constraints],
            "targets": list(self.targets),
            "params_file": self.params_file,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
