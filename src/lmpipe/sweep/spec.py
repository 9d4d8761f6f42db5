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
writes, and a swept param that no stage up to the objective's stage reads. The result is a
`lmpipe.sweep.plan.Spec`; `lmpipe.sweep.space` parses and checks each swept param.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmpipe.config import ParamsError, read_yaml, read_yaml_file
from lmpipe.pipeline import producer, upstream
from lmpipe.sweep.plan import Constraint, MetricRef, Plot, Spec, SweepError
from lmpipe.sweep.space import check_param, parse_dim

_CONSTRAINT = re.compile(r"^\s*(\S+?)\s*(<=|>=|<|>)\s*(\S+)\s*$")


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


def load_spec(path: str | Path, root: str | Path = ".") -> Spec:
    """Read and validate a spec against the project at `root` (its dvc.yaml and params file)."""
    path = Path(path)
    raw = read_yaml_file(path, SweepError, "sweep spec")
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
        check_param(d, base)

    objective = parse_metric(s.objective.metric)
    constraints = tuple(parse_constraint(c, objective.path) for c in s.constraints)
    plot = None
    if s.plot:
        ys = tuple(parse_metric(y, objective.path) for y in s.plot.y)
        plot = Plot(parse_metric(s.plot.x, objective.path), ys, s.plot.group)
    elif objective.path.endswith("rl.json"):
        plot = Plot(
            MetricRef(objective.path, "kl_to_ref"),
            (
                MetricRef(objective.path, "gold_reward.final"),
                MetricRef(objective.path, "proxy_reward.final"),
            ),
            "rl.algo",
        )

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
            raise SweepError(
                f"no stage in dvc.yaml writes {f}; the objective, constraints and "
                "plot must read a stage's reports file"
            )
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
        targets = tuple(
            t
            for t in stages
            if t in wanted and not any(t in upstream(stages, [o]) for o in wanted - {t})
        )
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
        name=name,
        dims=dims,
        search=s.search,
        trials=trials,
        parallel=s.parallel,
        seed=s.seed,
        objective=objective,
        direction=s.objective.direction,
        constraints=constraints,
        targets=targets,
        params_file=s.params_file,
        plot=plot,
    )
