"""The bench/ scripts stay runnable: each imports and parses `--help`, and the training bench's
profile runs on a small shape. (Their figures are printed, never asserted: see README.)"""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name[:-3]}", BENCH / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_benches():
    assert "train_throughput.py" in SCRIPTS and "reward_variants.py" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_imports_and_parses_help(name, monkeypatch, capsys):
    module = load(name)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_train_throughput_profile_runs(monkeypatch, capsys):
    module = load("train_throughput.py")
    monkeypatch.setattr(sys, "argv", ["x", "--shapes", "nanogpt", "--profile", "--device", "cpu"])
    module.main()
    out = capsys.readouterr().out
    assert "--- ours (nanogpt), 5 steps" in out and "aten::mm" in out
