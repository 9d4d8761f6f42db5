import json
import time
from pathlib import Path

import mlflow
import pytest

from lmpipe.config import Params, TokenizerParams, TrackingParams
from lmpipe.io import write_json
from lmpipe.tracking.report import flatten_numeric, model_card
from lmpipe.tracking.run import PIPELINE_KEY, _is_dvc, pipeline_key, stage_run
from lmpipe.tracking.store import resolve_uri
from lmpipe.tracking.tracker import NullTracker, TrackingError


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


def test_stages_of_one_pipeline_nest_under_one_pipeline_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingParams(uri="sqlite:///store.db", experiment="t")
    up = tmp_path / "up"
    up.mkdir()
    write_json(up / "lmpipe.json", {"stage": "prepare"})
    monkeypatch.setenv("LMPIPE_PIPELINE_RUN", "first")
    with stage_run("prepare", params(), cfg, root=tmp_path) as a:
        a.log_outputs({"data": up})
    monkeypatch.setenv("LMPIPE_PIPELINE_RUN", "second")  # a later `dvc repro` reruns one stage
    with stage_run("pretrain", params(), cfg, {"data": up}, root=tmp_path) as b:
        pass
    with pytest.raises(ValueError), stage_run("sft", params(), cfg, root=tmp_path) as c:
        raise ValueError("boom")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/store.db")
    runs = {
        r.info.run_id: r
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
    }
    pipelines = {
        r.data.tags[PIPELINE_KEY]: r
        for r in runs.values()
        if r.data.tags.get("lmpipe.stage") == "pipeline"
    }
    assert sorted(pipelines) == ["first", "second"] and len(runs) == 5
    first, second = pipelines["first"], pipelines["second"]
    assert runs[a.run_id].data.tags["mlflow.parentRunId"] == first.info.run_id
    for child in (b, c):
        assert runs[child.run_id].data.tags["mlflow.parentRunId"] == second.info.run_id
    assert first.info.status == "FINISHED" and second.info.status == "FAILED"
    # the stage the second pipeline did not rerun is linked, not copied
    assert second.data.tags["lmpipe.reused.prepare"] == a.run_id
    assert len(runs[b.run_id].data.tags["lmpipe.params.sha256"]) == 64
    (dataset,) = runs[b.run_id].inputs.dataset_inputs
    assert dataset.dataset.name == up.as_posix() and dataset.tags[0].value == "data"
    assert dataset.dataset.digest == runs[b.run_id].data.tags["input.data.sha256"][:32]


def test_the_pipeline_key_is_the_dvc_process_that_started_the_stage(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.delenv("LMPIPE_PIPELINE_RUN", raising=False)
    assert pipeline_key() is None  # pytest runs under no dvc
    fake = tmp_path / "dvc"  # a process whose command line is DVC's, running a "stage"
    fake.write_text(
        "import os, subprocess, sys\n"
        "code = 'from lmpipe.tracking.run import pipeline_key; print(pipeline_key())'\n"
        "for _ in range(2):\n"
        "    subprocess.run(['sh', '-c', f'{sys.executable} -c \"{code}\"'], check=True)\n"
        "print(os.getpid())\n"
    )
    out = subprocess.run([sys.executable, str(fake)], capture_output=True, text=True, check=True)
    first, second, pid = out.stdout.split()
    assert first == second and first.split(":")[1] == pid


def test_a_dvc_command_line_is_recognised():
    assert _is_dvc(["/venv/bin/python", "/venv/bin/dvc", "repro"])
    assert _is_dvc(["dvc", "exp", "run"]) and _is_dvc(["python3", "-m", "dvc", "repro"])
    assert not _is_dvc(["python", "stages/sft.py", "--params", "dvc.yaml"])


def test_a_model_card_gives_the_headline_figures():
    report = {"val_loss": 1.23456, "gold_reward": {"final": 0.5}, "algo": "ppo"}
    card = model_card("rl", report, ("val_loss", "gold_reward.final", "algo", "missing"))
    assert card == "lmpipe rl model: val_loss 1.235, gold_reward.final 0.5"


def test_summary_line_reads_the_json_report_of_every_stage(tmp_path):
    """Each stage's last log line carries its headline figures: from `--report`, or for
    evaluate from `--metrics` (its `--report` is the Markdown report card)."""
    from lmpipe.stage import report_path, summary_line

    metrics = tmp_path / "metrics.json"
    metrics.write_text(
        json.dumps(
            {
                "variants": {
                    "rl": {"gold_reward": 0.5, "kl_to_sft": 3.25},
                    "sft": {"gold_reward": 0.125},
                }
            }
        )
    )
    argv = ["--metrics", str(metrics), "--report", str(tmp_path / "report.md")]
    assert report_path(argv) == metrics
    line = summary_line("evaluate", 83, report_path(argv))
    assert line == (
        "evaluate finished in 1m23s: variants.rl.gold_reward 0.5, "
        "variants.rl.kl_to_sft 3.25, variants.sft.gold_reward 0.125"
    )
    assert report_path(["--report", "r.json"]) == Path("r.json")
    assert summary_line("rl", 5, None) == "rl finished in 5s"
