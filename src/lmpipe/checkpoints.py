"""Resumable training checkpoints: one file per training run, in a folder keyed by the hash of
its params and inputs."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmpipe.io import hash_obj

log = logging.getLogger(__name__)


@dataclass
class CheckpointStore:
    """One checkpoint file per training run, in a folder keyed by the hash of params + inputs:
    a run with other params or inputs looks in another folder and never resumes this one."""

    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / "checkpoint.pt"

    def save(self, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt checkpoint is discarded, never half-used
            log.warning("ignoring unreadable checkpoint %s (%s)", self.path, err)
            return None

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def checkpoint_store(root: str | Path, stage: str, key: dict[str, Any]) -> CheckpointStore:
    """`<root>/<stage>-<hash>`: the hash covers params and input hashes (see CheckpointStore)."""
    return CheckpointStore(Path(root) / f"{stage}-{hash_obj(key)[:16]}")
