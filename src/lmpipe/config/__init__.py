"""Typed, validated params: one pydantic model per section of `params.yaml`.

Every field has a default and a one-line description; unknown keys and wrong types fail at load
time, before any work, with the full key (`data.val_fraction`), the bad value and what is allowed.
The section models live by stage family (`inputs`, `training`, `rl`, `release`); this module holds
the registry of sections, loading and validation, and the rendering of `params.yaml`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmpipe.config.base import (
    ParamsError,
    Section,
    flatten,
    format_error,
    load_yaml,
    moved_key,
    read_yaml_file,
    subsection,
)
from lmpipe.config.inputs import BaseParams, DataParams, ModelParams, TokenizerParams
from lmpipe.config.release import CompressParams, EvaluateParams, ExportParams, TrackingParams
from lmpipe.config.rl import RLParams
from lmpipe.config.training import (
    PreferenceParams,
    PretrainParams,
    RewardParams,
    SftParams,
    TrainParams,
)

__all__ = [
    "SECTIONS",
    "BaseParams",
    "CompressParams",
    "DataParams",
    "ModelParams",
    "Params",
    "ParamsError",
    "PreferenceParams",
    "PretrainParams",
    "RLParams",
    "RewardParams",
    "TokenizerParams",
    "TrackingParams",
    "TrainParams",
    "flatten",
    "load_params",
    "load_yaml",
    "moved_key",
    "parse_section",
    "read_yaml",
    "read_yaml_file",
    "render_params_yaml",
    "subsection",
    "validate_doc",
]

SECTIONS: dict[str, type[Section]] = {
    "base": BaseParams,
    "data": DataParams,
    "tokenizer": TokenizerParams,
    "model": ModelParams,
    "pretrain": PretrainParams,
    "sft": SftParams,
    "preference": PreferenceParams,
    "reward": RewardParams,
    "rl": RLParams,
    "compress": CompressParams,
    "export": ExportParams,
    "evaluate": EvaluateParams,
    "tracking": TrackingParams,
}
"""Section name → model. Later stages add theirs here."""


@dataclass(frozen=True)
class Params:
    """The sections a stage asked for, validated; `seed` is always there."""

    seed: int
    sections: dict[str, Section]

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"params section {name!r} was not loaded by this stage")

    def flat(self) -> dict[str, Any]:
        """`{"seed": 1, "data.source": "builtin", "rl.ppo.clip": 0.2, ...}` — what MLflow logs."""
        out: dict[str, Any] = {"seed": self.seed}
        for name, section in self.sections.items():
            out.update(flatten(section.model_dump(), f"{name}."))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, **{k: v.model_dump() for k, v in self.sections.items()}}


def parse_section(name: str, raw: Any) -> Section:
    """Validate one section; raise ParamsError with a message a user can act on."""
    if name not in SECTIONS:
        near = difflib.get_close_matches(name, list(SECTIONS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ParamsError(f"unknown params section {name!r}.{hint} Known: {', '.join(SECTIONS)}")
    model = SECTIONS[name]
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{name}: expected a mapping of keys, got {raw!r}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(format_error(name, model, raw, err)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The sections of a params file, as written (not yet validated)."""
    path = Path(path)
    doc = read_yaml_file(path, ParamsError, "params file")
    if not isinstance(doc, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    return doc


def load_params(path: str | Path, sections: list[str]) -> Params:
    """Load `seed` and the named sections of a params file, validating all of them.

    Every section present in the file is validated (a typo in an unrelated section still fails
    early), but only `sections` are returned — what the stage depends on.
    """
    return validate_doc(read_yaml(path), sections, where=str(path))


def validate_doc(doc: dict[str, Any], sections: list[str], where: str = "params") -> Params:
    """`load_params` on a dict already read (or merged): every section validated."""
    unknown = [k for k in doc if k != "seed" and k not in SECTIONS]
    if unknown:
        parse_section(unknown[0], doc[unknown[0]])  # raises with a suggestion
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParamsError(f"seed = {seed!r}: must be a non-negative integer")
    errors = []
    parsed: dict[str, Section] = {}
    for name in SECTIONS:
        try:
            parsed[name] = parse_section(name, doc.get(name))
        except ParamsError as err:
            errors.append(str(err))
    if errors:
        raise ParamsError(f"invalid params in {where}:\n" + "\n".join(errors))
    return Params(seed=seed, sections={s: parsed[s] for s in sections})


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render_params_yaml(header: str = "") -> str:
    """params.yaml text for the defaults, each key commented with its description.

    `params.yaml` is written once from this and then edited by users; a test checks that every
    key of every section is there with its description, so the two never drift.
    """
    lines = [header.rstrip(), ""] if header else []
    lines.append("seed: 1337  # every random generator of every stage derives from this")
    for name, model in SECTIONS.items():
        lines.append("")
        lines.append(f"{name}:  # {(model.__doc__ or '').strip().splitlines()[0]}")
        lines += _render_keys(model, "  ")
    return "\n".join(lines) + "\n"


def _render_keys(model: type[Section], indent: str) -> list[str]:
    lines = []
    for key, info in model.model_fields.items():
        sub = subsection(model, key)
        if sub is not None:
            lines.append(f"{indent}{key}:  # {info.description}")
            lines += _render_keys(sub, indent + "  ")
        else:
            lines.append(f"{indent}{key}: {_yaml_scalar(info.default)}  # {info.description}")
    return lines
