"""The pipeline's tracking against a real PostgreSQL backend (what the shared MLflow server in
docker-compose.mlflow.yml uses): a stage logs its run there and `lmpipe compare` reads it back.

Starts a throwaway PostgreSQL cluster from the server binaries when they are installed (Debian's
postgresql package); skipped where they are not.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, merge

pytestmark = pytest.mark.e2e


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres(tmp_path):
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pytest.importorskip("psycopg")
    # outside pytest's tmp dirs (mode 0700): the server may run as another user
    top = Path(tempfile.mkdtemp(prefix="lmpipe-pg-"))
    data, sock = top / "pg", top / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser to start PostgreSQL as another user")
        for d in (top, sock):
            shutil.chown(d, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(
        [*prefix, initdb, "-D", str(data), "-U", "lmpipe", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {sock} -h 127.0.0.1"
    subprocess.run(
        [*prefix, pg_ctl, "-D", str(data), "-o", opts, "-w", "-l", str(top / "pg.log"), "start"],
        check=True,
        capture_output=True,
    )
    try:
        import psycopg

        for _ in range(50):
            try:
                conn = psycopg.connect(
                    host="127.0.0.1", port=port, user="lmpipe", dbname="postgres", autocommit=True
                )
                break
            except psycopg.OperationalError:
                time.sleep(0.2)
        conn.execute("CREATE DATABASE mlflow")
        conn.close()
        yield f"postgresql://lmpipe@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True
        )
        shutil.rmtree(top, ignore_errors=True)


def test_a_stage_tracks_to_postgresql_and_compare_reads_it(postgres, tmp_path):
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(merge(base, TINY), sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": postgres, "LMPIPE_LOG_LEVEL": "WARNING"}
    work = tmp_path / "work"
    work.mkdir()
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "stages/prepare.py"),
            "--params",
            str(params),
            "--corpus-dir",
            str(ROOT / "corpus"),
            "--out",
            str(work / "prepared"),
            "--report",
            str(work / "prepare.json"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=postgres)
    exp = client.get_experiment_by_name("lmpipe")
    runs = client.search_runs([exp.experiment_id])
    assert [r.data.tags["lmpipe.stage"] for r in runs] == ["prepare"]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["tokenizer.vocab_size"] == "512"
    assert runs[0].data.metrics["report/vocab_size"] == 512
    out = subprocess.run(
        [sys.executable, "-m", "lmpipe.cli", "compare", "--stage", "prepare", "--format", "csv"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert runs[0].info.run_id[:8] in out.stdout
