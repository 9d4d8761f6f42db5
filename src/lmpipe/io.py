"""Filesystem helpers every stage uses: atomic outputs, content hashes, git state, training-curve
CSVs."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; move it into place only on success.

    A stage that fails or is killed leaves the previous output (or nothing) at `final`, never a
    half-written directory that looks complete. The temporary sits in the same parent so the
    final rename is atomic on one filesystem.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are ordinary folders
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Any]:
    """A text file opened beside `path`, moved into place only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), sorted keys, trailing newline."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path: str | Path, rows: Any) -> None:
    """One JSON object per line, written atomically."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: run the stage that makes it") from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); delete it and rerun its stage"
        ) from None


def read_json_object(path: Path, error: type[Exception], fix: str) -> dict[str, Any]:
    """The JSON object in `path`, else `error` saying what is wrong with it, then `fix`."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON ({err}): {fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{path} is not a JSON object: {fix}")
    return obj


_HASHES: dict[tuple, str] = {}
"""hash_path results keyed by path and the (name, size, mtime) of its files: a stage hashes its
inputs once for tracking and once for its checkpoint key, and reads them only once."""


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file the pipeline wrote (blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def hash_path(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a directory's relative file names and contents (sorted)."""
    path = Path(path)
    if path.is_file():
        files = [path]
        base = path.parent
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        base = path
    else:
        raise FileNotFoundError(f"{path} does not exist")
    stats = [(f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = (str(path.resolve()), path.is_dir(), tuple(zip(map(str, files), stats, strict=True)))
    if key in _HASHES:
        return _HASHES[key]
    h = hashlib.sha256()
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(base).as_posix()).encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    _HASHES[key] = h.hexdigest()
    return _HASHES[key]


WALL_CLOCK = re.compile(r"(_seconds|per_sec(_b\d+)?|speedup(_b\d+)?|generate_share)$")
"""Names of figures that measure the machine, not the result: they differ between any two runs,
so they stay out of the outputs later stages depend on (manifests, training-curve CSVs)."""


def without_wall_clock(obj: Any) -> Any:
    """A nested dict without its wall-clock figures (see WALL_CLOCK)."""
    if isinstance(obj, dict):
        return {k: without_wall_clock(v) for k, v in obj.items() if not WALL_CLOCK.search(k)}
    return obj


def speed_csv(path: Path) -> Path:
    """Where write_history_csv puts a curve file's wall-clock columns: `<name>_speed.csv`."""
    return path.with_name(f"{path.stem}_speed{path.suffix}")


def write_history_csv(path: Path, history: Sequence[dict[str, float]]) -> None:
    """One row per logged step, every column that ever appeared (empty where absent).

    Wall-clock columns (throughput, time shares) go to `speed_csv(path)`, so the curves that
    later stages read are the same bytes for the same training, resumed or not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for row in history:
        cols.extend(k for k in row if k not in cols)
    for target, keep in ((path, False), (speed_csv(path), True)):
        fields = [c for c in cols if c == "step" or bool(WALL_CLOCK.search(c)) == keep]
        with target.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for row in history:
                if keep and not any(WALL_CLOCK.search(k) for k in row):
                    continue
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def hash_obj(obj: Any) -> str:
    """sha256 of a JSON-serialisable object in canonical form."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    """`{"git.commit": sha or "unknown", "git.dirty": "true"/"false"/"unknown"}`."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    if commit.returncode != 0:
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {
        "git.commit": commit.stdout.strip(),
        "git.dirty": "true" if status.stdout.strip() else "false",
    }
