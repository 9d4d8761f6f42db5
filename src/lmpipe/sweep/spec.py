"""The sweep spec: what to vary, how to search, what to optimise — validated before any trial.

A spec is YAML::

    name: kl-sweep                       # default: the spec file's stem
    params:                              # params.yaml keys, as `dvc exp run -S` names them
      rl.kl_coef: loguniform(0.01, 1)    # uniform(a, b), loguniform(a, b), int(a, b), logint(a, b)
      rl.algo: [ppo, rloo, dpg]          # a list: choices
    search: tpe                          # grid | random | tpe
    trials: 12                           # grid: at most the grid's size (the default)
    parallel: 1                          # > 1: trials run through DVC's queue, N at a time
    objective: {metric: reports/rl.json:gold_reward.final, direction: maximize}
    constraints: ["kl_to_ref <= 10"]     # [file:]key <= | >= | < | > number

Everything that can be checked without running a trial is checked here: unknown params (with a
suggestion), empty or inverted ranges, values the params schema refuses, a metric file no stage
writes, and a swept param that no stage up to the objective's stage reads.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmpipe.config import (
    SECTIONS,
    ParamsError,
    moved_key,
    parse_section,
    read_yaml,
    subsection,
)
from lmpipe.pipeline import producer, upstream


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


class _Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str = Field(description="file:key of a reports JSON, e.g. reports/rl.json:kl_to_ref")
    direction: Literal["maximize", "minimize"] = "maximize"


class _Plot(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: str
    y: list[str]
    group: str | None = None


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    params: dict[str, Any]
    search: Literal["grid", "random", "tpe"] = "tpe"
    trials: int | None = Field(default=None, ge=1)
    parallel: int = Field(default=1, ge=1)
    seed: int = Field(default=0, ge=0)
    objective: _Objective
    constraints: list[str] = []
    targets: list[str] | None = None
    params_file: str = "params.yaml"
    plot: _Plot | None = None

    @field_validator("constraints", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


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
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(
            *(d.choices for d in self.dims))]  # fmt: skip

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


_RANGE = re.compile(r"^\s*(uniform|loguniform|int|logint)\s*\(\s*([^,]+?)\s*,\s*([^)]+?)\s*\)\s*$")
_CONSTRAINT = re.compile(r"^\s*(\S+?)\s*(<=|>=|<|>)\s*(\S+)\s*$")


def parse_metric(text: str, default_path: str | None = None) -> MetricRef:
    """`file.json:key` (or `key` when `default_path` is given)."""
    if ":" in text:
        path, key = text.rsplit(":", 1)
    elif default_path:
        path, key = default_path, text
    else:
        raise SweepError(f"metric {text!r}: write it as FILE:KEY, e.g. reports/rl.json:kl_to_ref")
    if not path.endswith(".json") or not key:
        raise SweepError(f"metric {text!r}: FILE must be a .json report and KEY not empty")
    return MetricRef(path, key)


def parse_constraint(text: str, default_path: str) -> Constraint:
    m = _CONSTRAINT.match(text)
    if not m:
        raise SweepError(f"constraint {text!r}: write it as KEY <= NUMBER (or >=, <, >)")
    try:
        bound = float(m.group(3))
    except ValueError:
        raise SweepError(f"constraint {text!r}: {m.group(3)!r} is not a number") from None
    return Constraint(parse_metric(m.group(1), default_path), m.group(2), bound)  # type: ignore[arg-type]


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SweepError(f"{where}: {text!r} is not a number") from None


def parse_dim(name: str, raw: Any) -> Dim:
    """A list of choices or `uniform|loguniform|int|logint(low, high)`."""
    if isinstance(raw, list):
        if not raw:
            raise SweepError(f"params.{name}: the list of choices is empty")
        if len(set(map(json.dumps, raw))) != len(raw):
            raise SweepError(f"params.{name}: the choices {raw} repeat a value")
        return Dim(name, "choice", choices=tuple(raw))
    m = _RANGE.match(raw) if isinstance(raw, str) else None
    if not m:
        raise SweepError(
            f"params.{name} = {raw!r}: give a list of choices or a range such as "
            "uniform(0, 1), loguniform(0.01, 1), int(1, 8), logint(16, 256). A single value "
            "belongs in params.yaml"
        )
    kind, low, high = m.group(1), _number(m.group(2), name), _number(m.group(3), name)
    if not low < high:
        raise SweepError(f"params.{name} = {raw}: the range is empty (low must be below high)")
    if kind.startswith("log") and low <= 0:
        raise SweepError(f"params.{name} = {raw}: a log range needs low > 0")
    if kind in ("int", "logint") and (low != int(low) or high != int(high)):
        raise SweepError(f"params.{name} = {raw}: int ranges take whole numbers")
    return Dim(name, kind, low=low, high=high)  # type: ignore[arg-type]


def _check_param(dim: Dim, base: dict[str, Any]) -> None:
    """The param exists and the schema accepts the choices / both ends of the range."""
    if "." not in dim.name:
        raise SweepError(f"params.{dim.name}: write SECTION.KEY, e.g. rl.kl_coef")
    section, key = dim.section, dim.key
    if section not in SECTIONS or section == "tracking":
        near = difflib.get_close_matches(section, [s for s in SECTIONS if s != "tracking"], n=2)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise SweepError(f"params.{dim.name}: unknown params section {section!r}.{hint}")
    model, where = SECTIONS[section], section
    *path, leaf = key.split(".")
    for part in path:  # a nested section: rl.ppo.clip
        sub = subsection(model, part)
        if sub is None:
            raise SweepError(f"params.{dim.name}: {where} has no section {part!r}")
        model, where = sub, f"{where}.{part}"
    fields = model.model_fields
    if leaf not in fields:
        moved = moved_key(model, leaf)
        if moved is not None:
            raise SweepError(f"params.{dim.name}: moved to {where}.{moved}")
        near = difflib.get_close_matches(leaf, list(fields), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(where + '.' + n for n in near)}?" if near else ""
        raise SweepError(f"params.{dim.name}: {where} has no key {leaf!r}.{hint}")
    ann = fields[leaf].annotation
    if dim.kind in ("uniform", "loguniform") and ann is not float:
        raise SweepError(f"params.{dim.name} is not a float; use a list or int(a, b)")
    if dim.kind in ("int", "logint") and ann is not int:
        raise SweepError(f"params.{dim.name} is not an integer; use a list or (log)uniform")
    values = dim.choices if dim.kind == "choice" else (dim.low, dim.high)
    if dim.kind in ("int", "logint"):
        values = tuple(int(v) for v in values)
    for value in values:
        errors = override_errors(base, {dim.name: value})
        if errors:
            raise SweepError(f"params.{dim.name} = {value!r} is refused:\n" + "\n".join(errors))


def override_errors(base: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """What the params schema says of `base` with `{"section.key": value}` set: each section an
    override touches is validated whole, so combinations are checked too."""
    sections: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        section, *path, key = name.split(".")
        node = sections.setdefault(section, copy.deepcopy(base.get(section) or {}))
        for part in path:  # a nested section: rl.ppo.clip
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[key] = value
    errors = []
    for section, raw in sorted(sections.items()):
        try:
            parse_section(section, raw)
        except ParamsError as err:
            errors.append(str(err))
    return errors


def load_spec(path: str | Path, root: str | Path = ".") -> Spec:
    """Read and validate a spec against the project at `root` (its dvc.yaml and params file)."""
    path, root = Path(path), Path(root)
    if not path.exists():
        raise SweepError(f"sweep spec {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {err}") from None
    return validate_spec(raw, root, default_name=path.stem)


def validate_spec(raw: Any, root: str | Path, default_name: str = "sweep") -> Spec:
    root = Path(root)
    if not isinstance(raw, dict):
        raise SweepError("a sweep spec is a mapping with params, objective and search")
    try:
        s = _Spec.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "spec"
            if e["type"] == "extra_forbidden":
                lines.append(f"{loc}: unknown key (known: {', '.join(_Spec.model_fields)})")
            else:
                lines.append(f"{loc}: {e['msg']}")
        raise SweepError("invalid sweep spec:\n" + "\n".join(lines)) from None
    name = s.name or default_name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SweepError(f"name {name!r}: use letters, digits, '-', '_' and '.' (a git ref part)")
    if not s.params:
        raise SweepError("params: name at least one parameter to sweep")
    dims = tuple(parse_dim(k, v) for k, v in s.params.items())
    try:
        base = read_yaml(root / s.params_file)
    except ParamsError as err:
        raise SweepError(str(err)) from None
    for d in dims:
        _check_param(d, base)

    objective = parse_metric(s.objective.metric)
    constraints = tuple(parse_constraint(c, objective.path) for c in s.constraints)
    plot = None
    if s.plot:
        ys = tuple(parse_metric(y, objective.path) for y in s.plot.y)
        plot = Plot(parse_metric(s.plot.x, objective.path), ys, s.plot.group)
    elif objective.path.endswith("rl.json"):
        plot = Plot(
            MetricRef(objective.path, "kl_to_ref"),
            (MetricRef(objective.path, "gold_reward.final"),
             MetricRef(objective.path, "proxy_reward.final")),
            "rl.algo",
        )  # fmt: skip

    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.exists():
        raise SweepError(f"{dvc_yaml} not found: run lmpipe sweep in the project's root")
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    files = {objective.path, *(c.metric.path for c in constraints)}
    if plot:
        files |= {plot.x.path, *(y.path for y in plot.y)}
    makers = {}
    for f in sorted(files):
        stage = producer(stages, f)
        if stage is None:
            raise SweepError(f"no stage in dvc.yaml writes {f}; the objective, constraints and "
                             "plot must read a stage's reports file")  # fmt: skip
        makers[f] = stage
    if s.targets:
        unknown = [t for t in s.targets if t not in stages]
        if unknown:
            raise SweepError(f"targets: unknown stage(s) {unknown}; dvc.yaml has {list(stages)}")
        targets = tuple(s.targets)
        missing = {f for f, st in makers.items() if st not in upstream(stages, targets)}
        if missing:
            raise SweepError(f"targets {list(targets)} do not make {sorted(missing)}")
    else:
        # the stages that write the files read; drop any that another one already runs
        wanted = set(makers.values())
        targets = tuple(t for t in stages if t in wanted and not any(
            t in upstream(stages, [o]) for o in wanted - {t}))  # fmt: skip
    run_set = upstream(stages, targets)
    for d in dims:
        readers = [st for st in run_set if d.section in (stages[st].get("params") or [])]
        if not readers:
            raise SweepError(
                f"params.{d.name}: no stage up to {', '.join(targets)} reads the {d.section} "
                "section, so it cannot change the objective"
            )

    if s.search == "grid":
        ranged = [d.name for d in dims if d.kind != "choice"]
        if ranged:
            raise SweepError(f"grid search takes lists of choices; {ranged} are ranges")
        size = math.prod(len(d.choices) for d in dims)
        trials = min(s.trials or size, size)
    else:
        trials = s.trials or 10
    return Spec(
        name=name, dims=dims, search=s.search, trials=trials, parallel=s.parallel, seed=s.seed,
        objective=objective, direction=s.objective.direction, constraints=constraints,
        targets=targets, params_file=s.params_file, plot=plot,
    )  # fmt: skip
