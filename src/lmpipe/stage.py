"""What every stage script shares: logging, user-error reporting, threads, the manifest."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from lmpipe.config import ParamsError
from lmpipe.data.sources import DataError
from lmpipe.io import hash_path
from lmpipe.tracking import TrackingError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ParamsError,
    DataError,
    TrackingError,
    FileNotFoundError,
)
"""Errors caused by input or configuration: printed as one clear message, exit code 2."""


def setup_logging() -> None:
    level = os.environ.get("LMPIPE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )


def run(main: Callable[[], Any], stage: str) -> None:
    """Run a stage's `main`; user errors end with `stage: error: ...` and exit code 2."""
    setup_logging()
    try:
        main()
    except USER_ERRORS as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        sys.exit(2)


def checkpoint_key(params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the stage's params (not tracking) and the
    content hashes of its inputs. Computed on every DDP rank, since every rank resumes."""
    key = params.to_dict()
    key.pop("tracking", None)
    return {"params": key, "inputs": {name: hash_path(path) for name, path in inputs.items()}}


def manifest(
    stage: str, params: Any, tags: dict[str, str], run_id: str | None, metrics: dict[str, Any]
) -> dict[str, Any]:
    """The lmpipe.json of a model folder: what made it, from what, and how good it was."""
    return {
        "stage": stage,
        "params": params.to_dict(),
        "inputs": {k: v for k, v in tags.items() if k.startswith(("input.", "lineage."))},
        "git_commit": tags.get("git.commit", "unknown"),
        "git_dirty": tags.get("git.dirty", "unknown"),
        "mlflow_run_id": run_id,
        "metrics": metrics,
    }
