"""The search space: a swept param's choices or range as the spec writes it, and checks of
values against the params schema (a single value, or a trial's overrides together)."""

from __future__ import annotations

import copy
import difflib
import json
import re
from typing import Any

from lmpipe.config import SECTIONS, ParamsError, moved_key, parse_section, subsection
from lmpipe.sweep.plan import Dim, SweepError

_RANGE = re.compile(r"^\s*(uniform|loguniform|int|logint)\s*\(\s*([^,]+?)\s*,\s*([^)]+?)\s*\)\s*$")


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


def check_param(dim: Dim, base: dict[str, Any]) -> None:
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
