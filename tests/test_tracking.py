import time

import mlflow
import pytest

from lmpipe.config import Params, TokenizerParams, TrackingParams
from lmpipe.io import write_json
from lmpipe.tracking import (
    NullTracker,
    TrackingError,
    flatten_numeric,
    resolve_uri,
    stage_run,
)


def params() -> Params:
    return Params(seed=5, sections={"tokenizer": TokenizerParams(vocab_size=512)})


def test_run_lands_in_sqlite_with_params_tags_lineage(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    upstream = tmp_path / "up"
    upstream.mkdir()
    write_json(upstream / "lmpipe.json", {"stage": "pretrain"})
    cfg = TrackingParams(uri="sqlite:///store.db", experiment="t")
    with stage_run("pretrain", params(), cfg, root=tmp_path) as writer:
        writer.log_outputs({"model": upstream})
    with stage_run("prepare", params(), cfg, {"model": upstream}, root=tmp_path) as tr:
        tr.log_metrics({"train/loss": 1.5}, step=3)
        tr.log_report({"tokens": {"train": 10}, "algo": "ppo"}, "reports/prepare.json")
        run_id = tr.run_id
    assert (tmp_path / "store.db").exists()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/store.db")
    run = mlflow.get_run(run_id)
    assert run.info.run_name == "prepare" and run.info.status == "FINISHED"
    assert run.data.params["seed"] == "5"
    assert run.data.params["tokenizer.vocab_size"] == "512"
    assert run.data.tags["lmpipe.stage"] == "prepare"
    assert "git.commit" in run.data.tags and "git.dirty" in run.data.tags
    assert run.data.tags["lineage.model.run_id"] == writer.run_id
    assert len(run.data.tags["input.model.sha256"]) == 64
    assert run.data.metrics["train/loss"] == 1.5
    assert run.data.metrics["report/tokens.train"] == 10


def test_failed_stage_marks_run_failed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingParams(uri="sqlite:///store.db", experiment="t")
    with pytest.raises(ValueError), stage_run("x", params(), cfg, root=tmp_path) as tr:
        run_id = tr.run_id
        raise ValueError("boom")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/store.db")
    run = mlflow.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["lmpipe.error"] == "ValueError: boom"


def test_env_uri_wins_and_relative_paths_resolve(tmp_path, monkeypatch):
    cfg = TrackingParams(uri="sqlite:///mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert resolve_uri(cfg, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    # inside `dvc exp run --temp` the stage runs in a copy; DVC_ROOT names the project
    project = tmp_path / "project"
    monkeypatch.setenv("DVC_ROOT", str(project))
    copy = tmp_path / "project/.dvc/tmp/exps/tmpabc"
    assert resolve_uri(cfg, copy) == f"sqlite:///{project.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert resolve_uri(cfg, tmp_path) == "http://example.invalid:5000"


def test_runs_inside_a_dvc_experiment_carry_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "kl-sweep-3")
    with stage_run("x", params(), TrackingParams(enabled=False), root=tmp_path) as tr:
        pass
    assert tr.tags["dvc.exp_name"] == "kl-sweep-3"
    monkeypatch.delenv("DVC_EXP_NAME")
    with stage_run("x", params(), TrackingParams(enabled=False), root=tmp_path) as tr:
        pass
    assert "dvc.exp_name" not in tr.tags


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    # port 9 on loopback: nothing listens, the connection is refused at once
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    t0 = time.monotonic()
    with (
        pytest.raises(TrackingError, match="unreachable.*unset MLFLOW_TRACKING_URI"),
        stage_run("x", params(), TrackingParams(timeout_s=2), root=tmp_path),
    ):
        pytest.fail("the body must not run")
    assert time.monotonic() - t0 < 10


def test_disabled_tracking_uses_null_tracker(tmp_path):
    with stage_run("x", params(), TrackingParams(enabled=False), root=tmp_path) as tr:
        assert isinstance(tr, NullTracker) and tr.run_id is None
        tr.log_metrics({"a": 1}, step=0)
    assert tr.params["tokenizer.vocab_size"] == 512
    assert tr.metrics == [("a", 1.0, 0)]
    assert tr.tags["lmpipe.stage"] == "x"


def test_flatten_numeric_skips_strings_and_bools():
    assert flatten_numeric({"a": {"b": 1, "c": "x", "d": True}, "e": 2.5}, "r/") == {
        "r/a.b": 1.0,
        "r/e": 2.5,
    }
