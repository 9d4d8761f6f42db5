"""What every params section is built from: the Section model, the field types sections share,
nested subsections and moved keys, and the error a user reads when a value is wrong.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
"""What a `device` param may say."""


def _device(v: str) -> str:
    if not DEVICE.fullmatch(v):
        raise ValueError("use auto, cpu, cuda or cuda:N")
    return v


class ParamsError(ValueError):
    """Invalid `params.yaml`: the message says which key, what was given and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


# Fields several sections declare alike (same bounds, same description), each with its default.
LearningRate = Annotated[float, Field(gt=0, le=1, description="peak learning rate (after warmup)")]
WarmupSteps = Annotated[int, Field(ge=0, description="linear warmup steps")]
OptimizerSteps = Annotated[int, Field(ge=1, description="optimizer steps")]
WeightDecay = Annotated[
    float, Field(ge=0, description="AdamW decay on matrices (not norms/biases)")
]
GradClip = Annotated[float, Field(ge=0, description="max global grad norm (0 = off)")]
EvalEvery = Annotated[int, Field(ge=1, description="steps between evaluations")]
CheckpointEvery = Annotated[int, Field(ge=0, description="steps between checkpoints (0 = none)")]
Precision = Annotated[
    Literal["auto", "fp32", "bf16"],
    Field(description="auto: bf16 autocast on CUDA and on AMX or AVX512-BF16 CPUs, else fp32"),
]
Sharding = Annotated[
    Literal["none", "fsdp"],
    Field(
        description="under torchrun: none (DDP, whole model per process) or fsdp (weights, "
        "gradients and AdamW state split across processes)"
    ),
]
Device = Annotated[
    str,
    AfterValidator(_device),
    Field(description="auto (CUDA if present), cpu, cuda, cuda:N"),
]


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"rl": {"ppo": {"clip": 0.2}}}` → `{"rl.ppo.clip": 0.2}` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def subsection(model: type[Section], key: str) -> type[Section] | None:
    """The nested section model of `model.key` (`rl.ppo`), or None for a plain field."""
    info = model.model_fields.get(key)
    ann = info.annotation if info is not None else None
    return ann if isinstance(ann, type) and issubclass(ann, Section) else None


def moved_key(model: type[Section], key: str) -> str | None:
    """Where `key` of `model` now lives, relative to `model` (`clip` → `ppo.clip`), if it moved."""
    return getattr(model, "moved", {}).get(key)


def _describe_allowed(section: type[Section], field: str) -> str:
    info = section.model_fields.get(field)
    if info is None:
        return ""
    parts = []
    ann = info.annotation
    if getattr(ann, "__origin__", None) is Literal:
        parts.append("one of " + ", ".join(repr(a) for a in ann.__args__))
    for m in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sym} {getattr(m, attr)}")
    if info.description:
        parts.append(info.description)
    return "; ".join(parts)


def _owner(section: type[Section], loc: list[str]) -> tuple[type[Section], int]:
    """The (nested) section that holds the key of an error at `loc`, and that key's index."""
    i = 0
    while i < len(loc) - 1 and (sub := subsection(section, loc[i])) is not None:
        section, i = sub, i + 1
    return section, i


def format_error(name: str, section: type[Section], raw: dict, err: ValidationError) -> str:
    """One line per error of section `name`: the full key, the value given and what is allowed,
    the valid keys near an unknown one, or where a moved key lives now."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join([name, *loc]) if loc else name
        owner, i = _owner(section, loc)
        if e["type"] == "extra_forbidden":
            where = ".".join([name, *loc[:i]])
            moved = moved_key(owner, loc[i])
            if moved is not None:
                head, _, leaf = moved.rpartition(".")
                lines.append(
                    f"{key}: moved to {where}.{moved}; write {leaf} under {head} in {where}"
                )
                continue
            valid = list(owner.model_fields)
            near = difflib.get_close_matches(loc[i], valid, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            lines.append(f"{key}: unknown key. {hint}Valid keys of {where}: {', '.join(valid)}")
            continue
        value = raw
        for p in e["loc"]:
            value = value.get(p) if isinstance(value, dict) else None
        allowed = _describe_allowed(owner, loc[i]) if loc else ""
        msg = e["msg"].removeprefix("Value error, ")
        line = f"{key} = {value!r}: {msg}" if loc else f"{key}: {msg}"
        if allowed:
            line += f" (allowed: {allowed})"
        lines.append(line)
    return "\n".join(lines)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but reading `5e-5` and `1E3` as floats, as YAML 1.2 does (and DVC,
    which reads params.yaml with a 1.2 parser); YAML 1.1 wants a dot in a float (`5.0e-5`) and
    would hand the learning rate over as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """A YAML document or value as lmpipe reads params files, sweep specs and `KEY=VALUE`
    overrides: the safe loader, with exponent floats without a dot (`5e-5`) read as floats."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds no Python objects


def read_yaml_file(path: Path, error: type[Exception], what: str) -> Any:
    """The YAML document in `path` ({} when empty), else `error` saying the `what` (params file,
    sweep spec) is missing or not YAML."""
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    try:
        return load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise error(f"{path} is not valid YAML: {err}") from None
