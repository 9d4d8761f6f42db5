"""An exported bundle's manifest, `bundle.json`: input/output names, cache shapes, special and
stop token ids, generation defaults, hashes and lineage, and which model files the bundle has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmpipe.io import read_json_object

MANIFEST = "bundle.json"


class BundleError(ValueError):
    """The folder is not a usable bundle; the message says what is missing."""


def read_bundle(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise BundleError(f"{directory} is not an lmpipe ONNX bundle (no {MANIFEST}); run export")
    meta = read_json_object(path, BundleError, "rerun the export stage")
    missing = [k for k in ("files", "cache", "context", "special_tokens") if k not in meta]
    if missing:
        raise BundleError(f"{path} lacks {', '.join(missing) or 'its fields'}: rerun export")
    return meta
