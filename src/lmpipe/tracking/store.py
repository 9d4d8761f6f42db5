"""Where the MLflow store is: the tracking URI, artifact locations beside an embedded store
(moved with it when the project is copied), and whether a tracking server answers."""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from lmpipe.config import TrackingParams
from lmpipe.tracking.tracker import TrackingError

log = logging.getLogger(__name__)


def absolute_uri(uri: str, root: str | Path) -> str:
    """A relative `sqlite:///x.db` or plain path taken from `root`; other URIs unchanged."""
    root = Path(root).resolve()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(root / uri.removeprefix('sqlite:///')).as_posix()}"
    if "://" not in uri:
        return (root / uri).resolve().as_uri()
    return uri


def resolve_uri(cfg: TrackingParams, root: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` wins over `tracking.uri`; relative paths are taken from the project.

    The project is `DVC_ROOT` when DVC set it: `dvc exp run --temp` and `--queue` run the stages in
    a copy under .dvc/tmp/exps, and their runs belong in the project's store, not the copy's.
    """
    base = os.environ.get("DVC_ROOT") or root
    return absolute_uri(os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri, base)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside an embedded sqlite store (not in the
    working dir of whichever process created it); the server's default otherwise."""
    if uri.startswith("sqlite:"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
    ("logged_models", "artifact_location"),
)
"""Where MLflow's sqlite store records absolute artifact locations (tables missing in older
MLflow versions are skipped)."""


def relocate_store(uri: str) -> list[str]:
    """Point an embedded store's artifact locations at the folder it now sits in.

    MLflow records absolute paths, so a copied, cloned or container-mounted project would read
    its artifacts from the original folder (or nowhere). lmpipe keeps them in `mlartifacts`
    beside the sqlite file (`artifact_location`); every experiment whose location is another
    folder's `mlartifacts` has that folder's prefix rewritten to this one, in every table that
    stores a location. Run by every stage before it logs and by `lmpipe relocate-mlflow`.
    Returns the old folders; a server store or a store already in place is left alone.
    """
    if not uri.startswith("sqlite:///"):
        return []
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file():
        return []
    import sqlite3
    from urllib.parse import unquote, urlparse

    here = db.resolve().parent
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con, con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "experiments" not in tables:
            return []
        old = set()
        for (loc,) in con.execute("SELECT artifact_location FROM experiments"):
            loc = loc or ""
            path = Path(unquote(urlparse(loc).path) if loc.startswith("file:") else loc)
            if path.name == "mlartifacts" and path.parent != here:
                old.add(path.parent)
        for base in old:
            for prefix, new in (
                (base.as_uri() + "/", here.as_uri() + "/"),
                (base.as_posix() + "/", here.as_posix() + "/"),
            ):
                for table, column in ARTIFACT_COLUMNS:
                    if table in tables:
                        con.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE substr({column}, 1, ?) = ?",
                            (new, len(prefix) + 1, len(prefix), prefix),
                        )
    if old:
        log.info(
            "MLflow store %s: artifact locations moved from %s",
            db,
            ", ".join(map(str, sorted(old))),
        )
    return [str(b) for b in sorted(old)]


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast with a clear message when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status >= 500:
                raise TrackingError(f"MLflow server {uri} answered {resp.status} at /health")
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}) after {timeout_s:g}s. "
            "Start the server, fix MLFLOW_TRACKING_URI / tracking.uri, or unset "
            "MLFLOW_TRACKING_URI to use the embedded store (sqlite:///mlflow.db)."
        ) from None
