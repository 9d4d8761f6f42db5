"""What a stage's report becomes in MLflow: numeric metrics and a model version's description."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


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


def flatten_numeric(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as `{"prefix" + "a.b": value}` (bools and strings skipped)."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten_numeric(v, f"{prefix}{k}."))
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = float(obj)
    return out
