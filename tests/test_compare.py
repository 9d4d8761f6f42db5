"""`lmpipe compare`: runs logged to a temporary sqlite MLflow store, read back as a table."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmpipe.cli import app
from lmpipe.compare import (
    CompareError,
    RunRecord,
    build_table,
    fetch_runs,
    format_float,
    render,
    resolve_tracking_uri,
    varying_params,
    with_upstream,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
BASE_MS = 1_700_000_000_000
RL_RUNS = [  # (kl_coef, gold_reward.final), oldest first
    ("0.05", 0.412345),
    ("0.1", 0.523456),
    ("0.2", 0.634567),
]


def _log_run(
    client, exp_id: str, stage: str, start_ms: int, params: dict, metrics: dict, tags=None
) -> str:
    from mlflow.entities import Metric, Param

    run = client.create_run(
        exp_id,
        start_time=start_ms,
        run_name=stage,
        tags={"lmpipe.stage": stage, "git.commit": COMMIT, "git.dirty": "false", **(tags or {})},
    )
    run_id = run.info.run_id
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, start_ms, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
    )
    client.set_terminated(run_id, "FINISHED", end_time=start_ms + 1000)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Three `rl` runs differing only in `rl.kl_coef`, and one older `sft` run."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("lmpipe")
    ids = {
        "sft": _log_run(
            client,
            exp_id,
            "sft",
            BASE_MS - 60_000,
            {"seed": "7", "sft.lr": "0.003"},
            {"report/val_loss": 2.5, "report/val_ppl": 12.18249, "train/loss": 2.4},
        )
    }
    for i, (kl, gold) in enumerate(RL_RUNS):
        ids[f"rl{i}"] = _log_run(
            client,
            exp_id,
            "rl",
            BASE_MS + i * 60_000,
            {"seed": "7", "rl.algo": "ppo", "rl.kl_coef": kl},
            {
                "report/gold_reward.final": gold,
                "report/kl_to_ref": 0.1 * (i + 1),
                "report/proxy_reward.final": 1.0 + i,
                "rl/kl": 0.01,
            },
        )
    return {"uri": uri, "root": root, "ids": ids}


@pytest.fixture(scope="module")
def pipeline_store(tmp_path_factory) -> dict:
    """Two pipeline results: one sft run, two rl runs on it (`rl.kl_coef` 0.1 and 0.2) and an
    evaluate run on each, linked by `lineage.*.run_id` tags as the stages log them."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("pipeline")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("lmpipe")
    sft = _log_run(
        client, exp_id, "sft", BASE_MS, {"seed": "7", "sft.lr": "0.003"}, {"report/val_loss": 2.5}
    )
    ids = {}
    for i, kl in enumerate(("0.1", "0.2")):
        start = BASE_MS + (i + 1) * 60_000
        rl = _log_run(
            client,
            exp_id,
            "rl",
            start,
            {"seed": "7", "rl.kl_coef": kl},
            {"report/gold_reward.final": 0.5 + i},
            tags={"lineage.sft.run_id": sft},
        )
        ids[kl] = _log_run(
            client,
            exp_id,
            "evaluate",
            start + 30_000,
            {"seed": "7", "evaluate.samples_per_prompt": "8"},
            {
                "report/variants.rl.gold_reward": 0.4 + i / 10,
                "report/variants.rl.ppl": 40.0,
                "report/variants.rl.kl_to_sft": 2.0 + i,
                "report/variants.sft.gold_reward": 0.15,
            },
            tags={"lineage.rl.run_id": rl, "lineage.sft.run_id": sft},
        )
    return {"uri": uri, "ids": ids, "sft": sft}


def invoke(*args: str):
    return CliRunner().invoke(app, ["compare", *args])


def test_rows_newest_first_with_only_the_differing_params(store):
    runs = fetch_runs(store["uri"], "lmpipe", stage="rl")
    assert [r.params["rl.kl_coef"] for r in runs] == ["0.2", "0.1", "0.05"]
    table = build_table(runs, stage="rl")
    assert table.headers[:5] == ["run", "stage", "start", "status", "commit"]
    assert "rl.kl_coef" in table.headers
    assert "seed" not in table.headers and "rl.algo" not in table.headers
    assert table.headers[-3:] == ["gold_reward.final", "proxy_reward.final", "kl_to_ref"]
    first = dict(zip(table.headers, table.rows[0], strict=True))
    assert first["run"] == store["ids"]["rl2"][:8]
    assert first["stage"] == "rl" and first["status"] == "FINISHED"
    assert first["commit"] == COMMIT[:7]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", first["start"])
    assert first["gold_reward.final"] == pytest.approx(0.634567)


def test_all_params_and_metric_override(store):
    runs = fetch_runs(store["uri"], "lmpipe", stage="rl")
    table = build_table(runs, stage="rl", all_params=True, metrics=["kl_to_ref", "rl/kl"])
    assert {"seed", "rl.algo", "rl.kl_coef"} <= set(table.headers)
    assert table.headers[-2:] == ["kl_to_ref", "rl/kl"]


def test_stage_filter_and_last(store):
    sft = fetch_runs(store["uri"], "lmpipe", stage="sft")
    assert [r.stage for r in sft] == ["sft"]
    everything = fetch_runs(store["uri"], "lmpipe")
    assert [r.stage for r in everything] == ["rl", "rl", "rl", "sft"]
    newest = fetch_runs(store["uri"], "lmpipe", stage="rl", last=2)
    assert [r.params["rl.kl_coef"] for r in newest] == ["0.2", "0.1"]


def test_param_logged_by_only_some_runs_of_a_stage_differs():
    runs = [
        RunRecord("a" * 32, "rl", None, "FINISHED", "", {"seed": "1", "rl.new": "x"}),
        RunRecord("b" * 32, "rl", None, "FINISHED", "", {"seed": "1"}),
        RunRecord("c" * 32, "sft", None, "FINISHED", "", {"seed": "1", "sft.lr": "0.1"}),
    ]
    assert varying_params(runs) == ["rl.new"]


def test_csv_parses_back_with_the_values(store):
    res = invoke("--tracking-uri", store["uri"], "--stage", "rl", "--format", "csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["rl.kl_coef"] for r in rows] == ["0.2", "0.1", "0.05"]
    assert [r["gold_reward.final"] for r in rows] == ["0.6346", "0.5235", "0.4123"]
    assert rows[0]["run"] == store["ids"]["rl2"][:8]
    assert "posterior_kl" not in rows[0]  # not logged by any shown run


def test_markdown_has_a_header_separator(store):
    res = invoke("--tracking-uri", store["uri"], "--stage", "rl", "--format", "markdown")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("| run | stage |") and "rl.kl_coef" in lines[0]
    assert re.fullmatch(r"\|(-{3,}:?\|)+", lines[1])
    assert len(lines) == 2 + len(RL_RUNS)
    assert "0.6346" in lines[2]


def test_cli_prints_the_table(store):
    res = invoke("--tracking-uri", store["uri"], "--stage", "rl")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "stage", "start"]
    assert "rl.kl_coef" in lines[0] and "gold_reward.final" in lines[0]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert [line.split()[0] for line in lines[2:]] == [
        store["ids"][f"rl{i}"][:8] for i in (2, 1, 0)
    ]
    assert "seed" not in lines[0]


def test_no_stage_shows_pipeline_results_with_upstream_params_and_headlines(pipeline_store):
    res = invoke("--tracking-uri", pipeline_store["uri"], "--format", "csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["stage"] for r in rows] == ["evaluate", "evaluate"]
    assert [r["run"] for r in rows] == [pipeline_store["ids"][k][:8] for k in ("0.2", "0.1")]
    # rl.kl_coef was logged by the rl runs upstream, and is the only param that differs
    assert [r["rl.kl_coef"] for r in rows] == ["0.2", "0.1"]
    assert "sft.lr" not in rows[0] and "seed" not in rows[0]
    # the headline columns under their reports/headline.json names; unlogged ones left out
    assert list(rows[0])[-4:] == ["sft_gold", "rl_gold", "rl_kl", "rl_ppl"]
    assert [r["rl_gold"] for r in rows] == ["0.5", "0.4"] and rows[0]["rl_kl"] == "3"
    assert "" not in rows[0].values()


def test_no_stage_all_params_include_every_upstream_stage(pipeline_store):
    runs = fetch_runs(pipeline_store["uri"], "lmpipe", stage="evaluate", lineage=True)
    assert runs[0].params["sft.lr"] == "0.003" and runs[0].params["rl.kl_coef"] == "0.2"
    assert "rl.kl_coef" not in fetch_runs(pipeline_store["uri"], "lmpipe", "evaluate")[0].params
    res = invoke("--tracking-uri", pipeline_store["uri"], "--all-params", "--metric", "rl_gold")
    assert res.exit_code == 0, res.output
    header = res.stdout.splitlines()[0].split()
    assert {"sft.lr", "rl.kl_coef", "evaluate.samples_per_prompt"} <= set(header)
    assert header[-1] == "rl_gold" and "rl_kl" not in header


def test_upstream_params_follow_lineage_and_the_runs_own_value_wins():
    def run(run_id: str, params: dict, lineage: tuple = ()) -> RunRecord:
        return RunRecord(run_id, "x", None, "FINISHED", "", params, lineage=lineage)

    upstream = {
        "sft": run("sft", {"seed": "1", "sft.lr": "0.1"}, ("pre",)),
        "pre": run("pre", {"seed": "1", "pretrain.lr": "0.2"}),
    }
    ev = run("ev", {"seed": "2"}, ("sft", "gone"))  # "gone": a deleted run, skipped
    merged = with_upstream(ev, upstream)
    assert merged.params == {"seed": "2", "sft.lr": "0.1", "pretrain.lr": "0.2"}
    assert ev.params == {"seed": "2"}


def test_no_stage_without_evaluate_runs_says_to_pass_a_stage(store):
    res = invoke("--tracking-uri", store["uri"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "no runs of stage 'evaluate'" in res.stderr and "rl, sft" in res.stderr
    assert "pass --stage" in res.stderr


def test_unknown_experiment_lists_the_existing_ones(store):
    res = invoke("--tracking-uri", store["uri"], "--experiment", "nope")
    assert res.exit_code == 2
    assert "no experiment 'nope'" in res.stderr and "lmpipe" in res.stderr
    assert "Traceback" not in res.output


def test_no_matching_runs_names_the_stages_there(store):
    res = invoke("--tracking-uri", store["uri"], "--stage", "compress")
    assert res.exit_code == 2
    assert "no runs of stage 'compress'" in res.stderr and "rl, sft" in res.stderr


def test_missing_database_is_an_error_and_is_not_created(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    res = invoke("--stage", "rl")
    assert res.exit_code == 2
    assert "no MLflow database" in res.stderr and str(tmp_path) in res.stderr
    db = tmp_path / "other.db"
    res = invoke("--tracking-uri", f"sqlite:///{db}")
    assert res.exit_code == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"not a database at all"])
def test_a_file_that_is_not_an_mlflow_database_is_left_alone(tmp_path, content):
    db = tmp_path / "mlflow.db"
    db.write_bytes(content)
    res = invoke("--tracking-uri", f"sqlite:///{db}")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "not an MLflow database" in res.stderr or "not a readable SQLite" in res.stderr
    assert db.read_bytes() == content


def test_float_formatting():
    assert [format_float(x) for x in (0.634567, 3.0, 12.18249, 50123.4, 9999.5, 1e-5)] == [
        "0.6346",
        "3",
        "12.18",
        "50120",
        "10000",
        "1e-05",
    ]


def test_default_store_and_experiment_come_from_the_current_folder(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(store["root"])
    assert resolve_tracking_uri(None) == store["uri"]
    res = invoke("--stage", "sft", "--format", "csv")
    assert res.exit_code == 0, res.output
    assert len(list(csv.DictReader(io.StringIO(res.stdout)))) == 1
    (store["root"] / "params.yaml").write_text("tracking:\n  experiment: elsewhere\n")
    try:
        res = invoke("--stage", "sft")
    finally:
        (store["root"] / "params.yaml").unlink()
    assert res.exit_code == 2 and "no experiment 'elsewhere'" in res.stderr


def test_env_uri_is_used_without_the_option(store, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.chdir(tmp_path)
    res = invoke("--stage", "rl", "--last", "1", "--format", "csv")
    assert res.exit_code == 0, res.output
    assert len(list(csv.DictReader(io.StringIO(res.stdout)))) == 1


def test_unreachable_server_and_bad_format_exit_2(store):
    res = invoke("--tracking-uri", "http://127.0.0.1:9")
    assert res.exit_code == 2 and "unreachable" in res.stderr
    res = invoke("--tracking-uri", store["uri"], "--format", "xml")
    assert res.exit_code == 2 and "Traceback" not in res.output
    with pytest.raises(CompareError, match="unknown format"):
        render(build_table([]), "xml")


def test_unknown_metric_warns(store):
    res = invoke("--tracking-uri", store["uri"], "--stage", "rl", "--metric", "gold_reward.fnal")
    assert res.exit_code == 0
    assert "no shown run has metric 'gold_reward.fnal'" in res.stderr
    assert "report/gold_reward.final" in res.stderr


def test_cli_import_does_not_load_torch_or_mlflow():
    code = "import sys, lmpipe.cli; print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd()
    )
    assert out.stdout.strip() == "[]"
