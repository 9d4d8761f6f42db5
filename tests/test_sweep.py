"""`lmpipe sweep`: spec validation, the ask/tell loop with a fake executor, and one real sweep."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, env_for, run
from lmpipe.cli import app
from lmpipe.sweep.executor import (
    TrialOutcome,
    check_overrides,
    error_summary,
    format_override,
    lookup,
)
from lmpipe.sweep.plan import SweepError
from lmpipe.sweep.report import pareto, trial_rows, write_outputs
from lmpipe.sweep.run import best_trial, open_study, run_sweep
from lmpipe.sweep.spec import validate_spec

OBJ = {"metric": "reports/rl.json:gold_reward.final", "direction": "maximize"}


def spec_of(**over):
    raw = {
        "name": "t",
        "params": {"rl.kl_coef": "loguniform(0.01, 1)"},
        "search": "random",
        "trials": 4,
        "objective": OBJ,
        **over,
    }
    return validate_spec(raw, ROOT)


# --- the spec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"params": {"rl.kl_cof": [0.1]}}, "Did you mean rl.kl_coef"),
        ({"params": {"reinforce.kl_coef": [0.1]}}, "unknown params section"),
        ({"params": {"rl.kl_coef": "uniform(0.5, 0.5)"}}, "range is empty"),
        ({"params": {"rl.kl_coef": "loguniform(0, 1)"}}, "log range needs low > 0"),
        ({"params": {"rl.kl_coef": []}}, "list of choices is empty"),
        ({"params": {"rl.kl_coef": 0.1}}, "belongs in params.yaml"),
        ({"params": {"rl.algo": ["ppo", "a2c"]}}, "rl.algo = 'a2c' is refused"),
        ({"params": {"rl.steps": "uniform(1, 5)"}}, "not a float"),
        ({"params": {"rl.kl_coef": "uniform(-1, 1)"}}, "rl.kl_coef = -1.0 is refused"),
        ({"params": {"rl.clip": [0.1]}}, "moved to rl.ppo.clip"),
        ({"params": {"rl.ppo.clipp": [0.1]}}, "Did you mean rl.ppo.clip"),
        ({"params": {"rl.ppo.clip": [0.1, -1.0]}}, "rl.ppo.clip = -1.0 is refused"),
        ({"params": {"rl.ppo.epochs": "uniform(1, 5)"}}, "not a float"),
        ({"params": {"evaluate.eval_prompts": [8, 16]}}, "no stage up to rl reads"),
        ({"search": "grid"}, "grid search takes lists"),
        ({"objective": {"metric": "reports/nope.json:x"}}, "no stage in dvc.yaml writes"),
        ({"objective": {"metric": "gold"}}, "FILE:KEY"),
        ({"constraints": ["kl_to_ref =< 10"]}, "KEY <= NUMBER"),
        ({"targets": ["sft"]}, "do not make"),
        ({"trials": 0}, "trials"),
        ({"name": "a b"}, "name 'a b'"),
        ({"strategy": "tpe"}, "unknown key"),
    ],
)
def test_bad_specs_are_refused_with_what_to_fix(over, message):
    with pytest.raises(SweepError, match=message):
        spec_of(**over)


def test_targets_default_to_the_stage_writing_the_objective_and_grid_sizes_the_trials():
    s = spec_of(
        params={"rl.kl_coef": [0.05, 0.2], "rl.algo": ["ppo", "rloo"]}, search="grid", trials=None
    )
    assert s.targets == ("rl",) and s.trials == 4 and len(s.grid()) == 4
    s = spec_of(
        objective={"metric": "reports/metrics.json:models.rl.gold"},
        constraints=["reports/rl.json:kl_to_ref <= 10"],
    )
    assert s.targets == ("evaluate",)
    assert str(s.constraints[0]) == "reports/rl.json:kl_to_ref <= 10"


def test_cli_rejects_a_bad_spec_before_any_trial(tmp_path, monkeypatch):
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / f, tmp_path / f)
    spec = tmp_path / "s.yaml"
    spec.write_text(
        yaml.safe_dump({"params": {"rl.kl_cof": "uniform(0.1, 0.3)"}, "objective": OBJ})
    )
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["sweep", str(spec)])
    assert res.exit_code == 2
    assert "Did you mean rl.kl_coef" in res.output
    assert not (tmp_path / "sweeps").exists()
    spec.write_text(
        yaml.safe_dump({"params": {"rl.kl_coef": "uniform(0.3, 0.1)"}, "objective": OBJ})
    )
    res = CliRunner().invoke(app, ["sweep", str(spec)])
    assert res.exit_code == 2 and "range is empty" in res.output
    assert not (tmp_path / "sweeps").exists()


def test_a_spec_file_reads_exponent_choices_as_numbers(tmp_path, monkeypatch):
    """`rl.lr: [5e-5, 1e-4]` in a spec file is two floats (YAML 1.1 would read strings), shown
    and passed to DVC as numbers."""
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / f, tmp_path / f)
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "params:\n  rl.lr: [5e-5, 1e-4]\nsearch: grid\nobjective:\n"
        "  metric: reports/rl.json:gold_reward.final\n  direction: maximize\n"
    )
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["sweep", str(spec), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "rl.lr: [5e-05, 0.0001]" in res.output
    assert [format_override(v) for v in (5e-5, 1e-4)] == ["5.0e-05", "0.0001"]


def test_values_go_to_dvc_with_their_yaml_type():
    assert format_override(1e-05) == "1.0e-05"
    assert yaml.safe_load(format_override(1e-05)) == 1e-05
    assert format_override(0.25) == "0.25"
    assert format_override(True) == "true"
    assert format_override(3) == "3"
    assert format_override("rloo") == "rloo"
    assert yaml.safe_load(format_override("a b")) == "a b"


def test_lookup_follows_nesting_and_dotted_keys():
    doc = {"gold_reward": {"final": 0.5}, "eos_rate.final": 0.9, "m": {"rl": {"a.b": 2}}}
    assert lookup(doc, "gold_reward.final") == 0.5
    assert lookup(doc, "eos_rate.final") == 0.9
    assert lookup(doc, "m.rl.a.b") == 2
    assert lookup(doc, "gold_reward.init") is None


def test_pareto_keeps_the_points_nothing_beats_with_less_kl():
    pts = [(1, 0.2), (2, 0.1), (3, 0.5), (4, 0.4), (0.5, 0.2)]
    assert pareto(pts) == [(0.5, 0.2), (3, 0.5)]


def test_a_failed_trial_is_summarised_by_the_stage_error_not_dvc_noise():
    log = """Running stage 'rl':
> python stages/rl.py --params params.yaml
rl: error: invalid params in params.yaml:
rl: rl.algo 'rloo' needs rl.samples_per_prompt >= 2
ERROR: failed to reproduce 'rl': failed to run: python stages/rl.py, exited with 2
ERROR: failed to reproduce 'rl': failed to run: python stages/rl.py, exited with 2
"""
    assert error_summary(log, 255) == (
        "exit 255: rl: error: invalid params in params.yaml: | "
        "rl: rl.algo 'rloo' needs rl.samples_per_prompt >= 2"
    )
    crash = "Traceback (most recent call last):\n  File x\nRuntimeError: loss is nan at step 3\n"
    assert error_summary(crash + "ERROR: failed to reproduce 'rl'\n", 1) == (
        "exit 1: RuntimeError: loss is nan at step 3"
    )
    assert error_summary("ERROR: a\nERROR: a\n", 1) == "exit 1: ERROR: a"


def test_combinations_are_checked_before_a_trial_starts():
    params = ROOT / "params.yaml"
    bad = check_overrides(params, {"rl.algo": "rloo", "rl.samples_per_prompt": 1})
    assert bad.startswith("invalid params") and "samples_per_prompt" in bad
    assert check_overrides(params, {"rl.algo": "rloo", "rl.samples_per_prompt": 2}) is None
    assert check_overrides(params, {"rl.ppo.clip": 0.1, "rl.dpg.swap_every": 2}) is None
    assert "rl.ppo.epochs = 0" in check_overrides(params, {"rl.ppo.epochs": 0})


# --- the loop, with a fake executor -----------------------------------------------------------


class FakeExecutor:
    """gold = 1 - (log10 β + 1)^2 peaks at β = 0.1; kl = 1/β; fails or dies where told."""

    def __init__(self, fail_at=(), nan_at=(), die_at=None):
        self.calls: list[dict] = []
        self.fail_at, self.nan_at, self.die_at = set(fail_at), set(nan_at), die_at

    def __call__(self, requests):
        out = []
        for r in requests:
            self.calls.append(dict(r.overrides))
            if self.die_at is not None and len(self.calls) == self.die_at:
                raise KeyboardInterrupt
            beta = r.overrides["rl.kl_coef"]
            if len(self.calls) in self.fail_at:
                out.append(TrialOutcome(error="exit 1: rl: error: boom", seconds=1.0))
                continue
            gold = math.nan if len(self.calls) in self.nan_at else 1 - (math.log10(beta) + 1) ** 2
            out.append(
                TrialOutcome(
                    values={
                        "reports/rl.json:gold_reward.final": gold,
                        "reports/rl.json:kl_to_ref": 1 / beta,
                        "reports/rl.json:proxy_reward.final": 2 * gold,
                    },
                    exp_rev="abc",
                    seconds=1.0,
                )
            )
        return out


def test_failed_and_nan_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    spec = spec_of(trials=5)
    study = open_study(spec, f"sqlite:///{tmp_path}/s.db")
    fake = FakeExecutor(fail_at={2}, nan_at={4})
    run_sweep(spec, study, fake, echo=lambda _: None)
    states = [t.state.name for t in study.trials]
    assert len(fake.calls) == 5 and states.count("COMPLETE") == 3 and states.count("FAIL") == 2
    assert study.trials[1].user_attrs["error"] == "exit 1: rl: error: boom"
    assert "is nan" in study.trials[3].user_attrs["error"]
    rows = trial_rows(study, spec)
    assert [r["status"] for r in rows] == ["complete", "failed", "complete", "failed", "complete"]


def test_constraint_excludes_infeasible_trials_from_the_best(tmp_path):
    spec = spec_of(
        params={"rl.kl_coef": [0.01, 0.1, 1.0]}, search="grid", constraints=["kl_to_ref <= 5"]
    )
    study = open_study(spec, f"sqlite:///{tmp_path}/s.db")
    run_sweep(spec, study, FakeExecutor(), echo=lambda _: None)
    # β = 0.1 has the best gold but KL 10 > 5; β = 1 (KL 1) is the best feasible one
    assert best_trial(study, spec).params == {"rl.kl_coef": 1.0}
    rows = {r["rl.kl_coef"]: r["status"] for r in trial_rows(study, spec)}
    assert rows == {0.01: "infeasible", 0.1: "infeasible", 1.0: "complete"}


def test_resume_after_ctrl_c_reruns_only_the_interrupted_trial(tmp_path):
    spec = spec_of(params={"rl.kl_coef": [0.01, 0.1, 1.0, 3.0]}, search="grid", trials=None)
    storage = f"sqlite:///{tmp_path}/s.db"
    fake = FakeExecutor(die_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, open_study(spec, storage), fake, echo=lambda _: None)
    assert len(fake.calls) == 3
    again = FakeExecutor()
    study = open_study(spec, storage)
    run_sweep(spec, study, again, echo=lambda _: None)
    # the interrupted trial and the one never started; not the two that finished
    assert (
        sorted(c["rl.kl_coef"] for c in again.calls)
        == [1.0, 3.0]
        == sorted([fake.calls[2]["rl.kl_coef"], 3.0])
    )
    done = sorted(t.params["rl.kl_coef"] for t in study.trials if t.state.name == "COMPLETE")
    assert done == [0.01, 0.1, 1.0, 3.0]


def test_resume_after_a_kill_reruns_the_trial_left_running(tmp_path):
    spec = spec_of(trials=3, search="tpe")
    storage = f"sqlite:///{tmp_path}/s.db"
    study = open_study(spec, storage)
    run_sweep(spec, study, FakeExecutor(), echo=lambda _: None)
    spec = spec_of(trials=5, search="tpe")  # extend the sweep: same space, more trials
    study = open_study(spec, storage)
    orphan = study.ask({"rl.kl_coef": optuna.distributions.FloatDistribution(0.01, 1, log=True)})
    # ... as a SIGKILL leaves it: RUNNING, never told
    fake = FakeExecutor()
    run_sweep(spec, open_study(spec, storage), fake, echo=lambda _: None)
    assert fake.calls[0] == orphan.params and len(fake.calls) == 2
    study = open_study(spec, storage)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 5
    assert all(0.01 <= t.params["rl.kl_coef"] <= 1 for t in study.trials)


def test_a_changed_search_space_is_not_resumed(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    open_study(spec_of(), storage)
    with pytest.raises(SweepError, match="another search space"):
        open_study(spec_of(params={"rl.kl_coef": "loguniform(0.01, 2)"}), storage)


def test_outputs_name_the_best_trial_and_how_to_reproduce_it(tmp_path):
    spec = spec_of(
        params={"rl.kl_coef": [0.01, 0.1, 1.0], "rl.algo": ["ppo", "rloo"]},
        search="grid",
        trials=None,
    )
    study = open_study(spec, f"sqlite:///{tmp_path}/s.db")
    run_sweep(spec, study, FakeExecutor(fail_at={6}), echo=lambda _: None)
    files = write_outputs(study, spec, tmp_path / "out")
    summary = files["summary"].read_text()
    best = best_trial(study, spec)
    assert best.params["rl.kl_coef"] == 0.1
    assert f"Best: trial {best.number}" in summary
    assert f"dvc exp apply t-{best.number} && dvc repro" in summary
    assert len(files["csv"].read_text().strip().splitlines()) == 1 + 6
    assert files["figure"].stat().st_size > 10_000


# --- a real sweep: DVC experiments on the tiny pipeline, killed and resumed --------------------


def mlflow_runs(repo):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("lmpipe")
    return client.search_runs([exp.experiment_id], max_results=1000)


def by_stage(runs):
    out: dict[str, int] = {}
    for r in runs:
        stage = r.data.tags.get("lmpipe.stage", r.info.run_name)
        out[stage] = out.get(stage, 0) + 1
    return out


@pytest.mark.e2e
def test_sweep_runs_dvc_experiments_resumes_after_kill_and_groups_runs(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    run(["git", "add", "-A"], repo)  # a user commits dvc.lock after `dvc repro`
    run([*git, "commit", "-qm", "repro"], repo)
    assert "up to date" in run(["dvc", "status"], repo).stdout, "the shared tiny repo is stale"
    base = yaml.safe_load((repo / "params.yaml").read_text())["rl"]["kl_coef"]
    values = [base * 4, base / 4, base * 16]
    (repo / "kl.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "kl",
                "params": {"rl.kl_coef": values},
                "search": "grid",
                "objective": OBJ,
                "constraints": ["kl_to_ref <= 1000"],
            }
        )
    )
    before = by_stage(mlflow_runs(repo))
    cmd = [sys.executable, "-m", "lmpipe.cli", "sweep", "kl.yaml"]
    proc = subprocess.Popen(
        cmd,
        cwd=repo,
        env=env_for(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in proc.stdout:  # kill the whole sweep (dvc included) once trial 1 has started
        seen.append(line)
        if line.startswith("trial 1 (kl-1)"):
            time.sleep(3)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert any(ln.startswith("trial 0: gold_reward.final") for ln in seen), "".join(seen)

    res = run(cmd, repo, timeout=900)
    assert "resuming with 1 of 3 trials done, 1 interrupted trial(s) to run again" in res.stdout
    study = optuna.load_study(study_name="kl", storage=f"sqlite:///{repo}/sweeps/kl/study.db")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["rl.kl_coef"] for t in done) == sorted(values)
    assert done[0].number == 0  # trial 0 kept, not run again
    summary = (repo / "sweeps/kl/summary.md").read_text()
    assert "dvc exp apply kl-" in summary and (repo / "sweeps/kl/frontier.png").exists()

    # every trial is a DVC experiment whose rl.json is the one the sweep recorded
    exps = run(["git", "for-each-ref", "--format=%(refname:lstrip=-1)", "refs/exps"], repo)
    names = set(exps.stdout.split())
    for t in done:
        assert t.user_attrs["exp_name"] in names
        shown = run(["git", "show", f"{t.user_attrs['exp_rev']}:params.yaml"], repo).stdout
        assert yaml.safe_load(shown)["rl"]["kl_coef"] == t.params["rl.kl_coef"]

    # upstream stages came from the cache: no new prepare/pretrain/sft/reward runs in MLflow
    runs = mlflow_runs(repo)
    after = by_stage(runs)
    for stage in ("prepare", "pretrain", "sft", "reward", "compress", "export", "evaluate"):
        assert after.get(stage, 0) == before.get(stage, 0), (stage, before, after)
    # one parent; each trial's pipeline run (and the killed attempt's) is its child, and each
    # new rl run is the child of one of those
    parents = [r for r in runs if r.data.tags.get("lmpipe.stage") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {r.data.tags["lmpipe.stage"] for r in children} == {"pipeline"}
    finished = {r.data.tags["dvc.exp_name"] for r in children if r.info.status == "FINISHED"}
    assert finished == {t.user_attrs["exp_name"] for t in done}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    assert after["rl"] - before.get("rl", 0) == len(children)
    pipeline_ids = {r.info.run_id for r in children}
    new_rl = [
        r
        for r in runs
        if r.data.tags.get("lmpipe.stage") == "rl"
        and r.data.tags.get("mlflow.parentRunId") in pipeline_ids
    ]
    assert len(new_rl) == len(children)
