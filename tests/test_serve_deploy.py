"""Deployment defaults: loopback unless asked, the key passed to the container, and the bind
address check behind the CLI's warning."""

from __future__ import annotations

import inspect
import shutil
import subprocess
from pathlib import Path

import pytest

from lmpipe import cli
from lmpipe.serve.main import is_loopback

ROOT = Path(__file__).resolve().parents[1]


def make_n(*args: str) -> str:
    res = subprocess.run(
        ["make", "-n", "docker-serve", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOST": "myhost"},
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_docker_serve_publishes_on_loopback_unless_asked():
    """It used to publish the unauthenticated server on every interface (-p 8000:8000)."""
    out = make_n()  # an environment HOST (zsh sets one) is not taken for the bind address
    assert "-p 127.0.0.1:8000:8000" in out and "-e LMPIPE_API_KEY" in out
    assert "-p 0.0.0.0:9000:8000" in make_n("HOST=0.0.0.0", "PORT=9000")


def test_the_cli_binds_loopback_by_default():
    assert inspect.signature(cli.serve).parameters["host"].default == "127.0.0.1"
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.8.0.1")] == [True] * 4
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org"))
