"""What a bench's `--json PATH` writes: its figures with the machine, the date and the command
that produced them, so that `bench/all.py --write` can render BENCHMARKS.md from the files alone.

    {"section": "attention", "command": "python bench/attention.py --repeats 3",
     "date": "2026-12-04", "machine": {"cpu": ..., "cores": 2, "capability": "AVX512",
     "gpu": null, "torch": "2.13.0+cpu"}, "figures": {...}}
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path


def stage_env(**extra: str) -> dict[str, str]:
    """The environment for a `dvc repro` a bench starts: the stages run `python` and `dvc` from
    PATH, so this interpreter's folder goes first, whether its venv is activated or not."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra}


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": gpu,
        "torch": torch.__version__,
    }


def command(argv: list[str] | None = None) -> str:
    """The command line as run from the repository root, `python bench/<script> <args>`, less
    its `--json PATH` (where the figures went, not how they were made)."""
    argv = list(sys.argv if argv is None else argv)
    args = []
    skip = False
    for a in argv[1:]:
        if skip or a.startswith("--json="):
            skip = False
            continue
        if a == "--json":
            skip = True
            continue
        args.append(a)
    return shlex.join(["python", f"bench/{Path(argv[0]).name}", *args])


def add_json_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")


def reports_date(reports: Path) -> str:
    """The date of the last commit of `reports` (today's where git has none)."""
    import subprocess

    out = subprocess.run(
        ["git", "log", "-1", "--format=%cs", "--", str(reports)],
        capture_output=True,
        text=True,
        cwd=reports.parent,
    )
    return out.stdout.strip() or time.strftime("%Y-%m-%d")


def write(path: Path | None, figures: dict, date: str | None = None) -> None:
    """Writes `figures` with the machine, the date (today's unless given) and this process's
    command to `path`."""
    if path is None:
        return
    doc = {
        "section": Path(sys.argv[0]).stem,
        "command": command(),
        "date": date or time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "figures": figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
