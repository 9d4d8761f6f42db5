"""Params profiles: a YAML of only the keys that differ from params.yaml (e.g. the GPU profile
params/gpu-125m.yaml), applied to params.yaml in place or turned into `dvc exp run -S` flags.

Both paths validate the merged result with the same schema as the stages, before anything is
written, so a profile with a typo never half-applies.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from lmpipe.config import SECTIONS, ParamsError, flatten, read_yaml, validate_doc


def read_profile(path: str | Path) -> dict[str, Any]:
    doc = read_yaml(path)
    for section, keys in doc.items():
        if section == "seed":
            continue
        if section not in SECTIONS:
            raise ParamsError(f"{path}: unknown params section {section!r}")
        if not isinstance(keys, dict):
            raise ParamsError(f"{path}: {section} must be a mapping of keys")
    return doc


def merged(base: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """`base` with each of `profile`'s keys set, nested sections (`rl.ppo`) key by key too."""
    out = dict(base)
    for key, value in profile.items():
        if isinstance(value, dict):
            out[key] = merged(out.get(key) or {}, value)
        else:
            out[key] = value
    return out


def _validate(doc: dict[str, Any], where: str) -> None:
    try:
        validate_doc(doc, list(SECTIONS))
    except ParamsError as err:
        raise ParamsError(f"{where} would give invalid params:\n{err}") from None


def apply(profile_path: str | Path, params_path: str | Path = "params.yaml") -> list[str]:
    """Write the profile's values into params.yaml, keeping its comments; the keys changed."""
    from ruamel.yaml import YAML

    profile = read_profile(profile_path)
    params_path = Path(params_path)
    _validate(merged(read_yaml(params_path), profile), f"{profile_path} on {params_path}")
    ry = YAML()
    ry.preserve_quotes = True
    ry.width = 100
    doc = ry.load(params_path.read_text(encoding="utf-8"))
    changed = []
    for key, value in flatten(profile).items():
        parts = key.split(".")
        node = doc
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        if node.get(parts[-1]) != value:
            node[parts[-1]] = value
            changed.append(key)
    buf = io.StringIO()
    ry.dump(doc, buf)
    tmp = params_path.with_suffix(".yaml.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    tmp.replace(params_path)
    return changed


def dvc_flags(profile_path: str | Path, params_path: str | Path = "params.yaml") -> list[str]:
    """`-S key=value` for every key of the profile: `dvc exp run $(lmpipe params flags P)`."""
    import json

    from lmpipe.sweep.executor import format_override

    profile = read_profile(profile_path)
    _validate(merged(read_yaml(params_path), profile), f"{profile_path} on {params_path}")
    flags = []
    for key, value in flatten(profile).items():
        if isinstance(value, list):
            text = json.dumps(value, separators=(",", ":"))
        else:
            text = format_override(value)
        if any(c.isspace() for c in text):
            raise ParamsError(
                f"{key} = {value!r}: a value with spaces cannot go through $(...); "
                "use `lmpipe params apply` instead"
            )
        flags += ["-S", f"{key}={text}"]
    return flags
