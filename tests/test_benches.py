"""The bench/ scripts stay runnable: each imports and parses `--help`, the training bench's
profile runs on a small shape, and BENCHMARKS.md is what `bench/all.py` renders from the
committed bench/results. (Their figures are printed, never asserted: see README.)"""

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def load(name: str):
    if str(BENCH) not in sys.path:  # as `python bench/<script>` has it: bench/_results.py
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name[:-3]}", BENCH / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
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


def test_stage_env_finds_this_interpreters_python_and_dvc_without_an_activated_venv(monkeypatch):
    """A bench run as `.venv/bin/python bench/real_text.py` starts `dvc repro`, whose stages run
    `python`: both must be the interpreter's own though PATH does not name its folder."""
    import shutil

    load("real_text.py")  # puts bench/ on sys.path, as running a bench does
    from _results import stage_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = stage_env(LMPIPE_LOG_LEVEL="WARNING")
    assert env["LMPIPE_LOG_LEVEL"] == "WARNING" and env["PATH"].endswith("/usr/bin:/bin")
    here = Path(sys.executable).parent
    assert Path(shutil.which("python", path=env["PATH"])).parent == here
    assert Path(shutil.which("dvc", path=env["PATH"])).parent == here


def test_train_throughput_profile_runs(monkeypatch, capsys):
    module = load("train_throughput.py")
    monkeypatch.setattr(sys, "argv", ["x", "--shapes", "nanogpt", "--profile", "--device", "cpu"])
    module.main()
    out = capsys.readouterr().out
    assert "--- ours (nanogpt), 5 steps" in out and "aten::mm" in out


def test_benchmarks_md_is_what_the_results_render():
    """`python bench/all.py --check BENCHMARKS.md` passes on the committed files."""
    all_ = load("all.py")
    assert (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8") == all_.render(), (
        "run `python bench/all.py --write BENCHMARKS.md`"
    )


def test_every_section_renders_its_command_machine_and_date():
    all_ = load("all.py")
    assert len({s.name for s in all_.SECTIONS}) == len(all_.SECTIONS)
    for s in all_.SECTIONS:
        assert (BENCH / s.argv[0].removeprefix("bench/")).is_file(), s.name
        assert s.cost in ("cheap", "expensive", "gpu") and s.what.endswith("."), s.name
        path = all_.RESULTS / f"{s.name}.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text(encoding="utf-8"))
        text = all_.render_section(s)
        assert f"```bash\n{doc['command']}\n```" in text, s.name
        assert doc["date"] in text and doc["machine"]["cpu"] in text, s.name
        assert "| ---" not in text and "|---" in text, s.name  # a table came out


def test_cheap_sections_write_json_that_renders(tmp_path, monkeypatch, capsys):
    """The tokenizer bench on a tiny corpus, the two report readers, the losses and the sampler
    benches, through `--json`."""
    all_ = load("all.py")
    runs = {
        "tokenizer": ["tokenizer_throughput.py", "--stories", "200", "--vocab", "512"],
        "pipeline": ["pipeline_report.py"],
        "rl_report": ["rl_report.py"],
        "losses": ["losses.py", "--repeats", "1"],
        "sampling_throughput": [
            "sampling_throughput.py",
            *("--shape", "tiny", "--batch", "4", "--new-tokens", "4", "--repeats", "1"),
            *("--engines", "lmpipe", "hf", "hf-static"),
        ],
    }
    runs["tokenizer"] += ["--repeats", "1"]
    for section, argv in runs.items():
        out = tmp_path / f"{section}.json"
        monkeypatch.setattr(sys, "argv", [f"bench/{argv[0]}", *argv[1:], "--json", str(out)])
        load(argv[0]).main()
        doc = json.loads(out.read_text(encoding="utf-8"))
        assert doc["command"] == "python bench/" + " ".join(argv)
        assert doc["machine"]["cores"] >= 1 and len(doc["date"]) == 10
        text = all_.render_section(all_.BY_NAME[section], tmp_path)
        assert doc["command"] in text and "|---" in text
    capsys.readouterr()


@pytest.mark.parametrize("alarm", ["raised", "swallowed"])
def test_sampling_bench_skips_a_compile_that_takes_too_long(tmp_path, monkeypatch, capsys, alarm):
    """A compiled engine past `--compile-timeout` is skipped with the reason; the rest run. Also
    when the alarm's exception is swallowed (dynamo catches exceptions while tracing: CI once ran
    the whole compile under a loaded machine), which here is an alarm that never rings."""
    out = tmp_path / "s.json"
    argv = ["--shape", "tiny", "--batch", "2", "--new-tokens", "3", "--repeats", "1"]
    argv += ["--engines", "lmpipe", "hf-compile", "--compile-timeout", "0.05", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["bench/sampling_throughput.py", *argv])
    bench = load("sampling_throughput.py")
    if alarm == "swallowed":
        monkeypatch.setattr(bench, "time_limit", lambda seconds: contextlib.nullcontext())
    bench.main()
    fig = json.loads(out.read_text(encoding="utf-8"))["figures"]
    assert [r["sampler"] for r in fig["rows"]] == ["lmpipe generate"]
    why = fig["skipped"]["transformers generate, static cache + compile"]
    assert "--compile-timeout" in why
    assert "Skipped transformers generate" in load("all.py").sampling_caption(fig)
    capsys.readouterr()


def test_gpu_figures_smoke_runs_every_piece_on_cpu(monkeypatch, capsys):
    """`bench/gpu_figures.py --smoke`: the GPU tests (skipped here) and each GPU section's
    script on tiny CPU arguments, into a temporary folder, each rendering a table."""
    module = load("gpu_figures.py")
    assert (
        {s.name for s in module.sections(False)}
        == set(module.SMOKE)
        == set(module.LIMITS) - {"tests"}
    )
    monkeypatch.setattr(sys, "argv", ["bench/gpu_figures.py", "--smoke"])
    module.main()
    out = capsys.readouterr().out
    assert all(f"--- {name}:" in out for name in module.SMOKE)


@pytest.mark.e2e
def test_benches_on_trained_models_run(tiny_repo, tmp_path, monkeypatch, capsys):
    """The benches that read a pipeline's models and data, on the tiny project's: each goes
    through the chat template as the stages do (the bare tokenizer has no template)."""
    models, data = tiny_repo / "models", tiny_repo / "data"
    runs = {
        "sampling_reward_workload": [
            "sampling_throughput.py",
            *("--model", str(models / "sft"), "--data", str(data / "prepared")),
            *("--k", "2", "--batch", "4", "--new-tokens", "4", "--repeats", "1"),
        ],
        "prune_importance": [
            "prune_importance.py",
            *("--model", str(models / "rl"), "--data", str(data / "prepared")),
            *("--calibration-batches", "1", "--batch-size", "4"),
        ],
        "reward_variants": [
            "reward_variants.py",
            *("--params", str(tiny_repo / "params.yaml"), "--sft", str(models / "sft")),
            *("--pairs", str(data / "preferences" / "pairs.jsonl"), "--steps", "2"),
            *("--lr", "1e-3", "2e-3", "--seeds", "2", "--batch-size", "1", "2"),
        ],
        "reward_residual": [
            "reward_residual.py",
            *("--params", str(tiny_repo / "params.yaml"), "--sft", str(models / "sft")),
            *("--pairs", str(data / "preferences" / "pairs.jsonl")),
        ],
    }
    runs["reward_data"] = [
        "reward_data.py",
        *("--params", str(tiny_repo / "params.yaml"), "--sft", str(models / "sft")),
        *("--data", str(data / "prepared"), "--prompts", "4", "400"),
    ]
    runs["critic_ev"] = [
        "critic_ev.py",
        *("--params", str(tiny_repo / "params.yaml"), "--sft", str(models / "sft")),
        *("--reward", str(models / "reward"), "--data", str(data / "prepared")),
        *("--stage-csv", str(tiny_repo / "reports" / "plots" / "rl.csv")),
        *("--steps", "3", "--at", "1", "3", "--episodes", "32", "--positions", "24"),
    ]
    for section, argv in runs.items():
        out = tmp_path / f"{section}.json"
        monkeypatch.setattr(sys, "argv", [f"bench/{argv[0]}", *argv[1:], "--json", str(out)])
        load(argv[0]).main()
        assert json.loads(out.read_text(encoding="utf-8"))["figures"]["rows"], section
    capsys.readouterr()
    rv = json.loads((tmp_path / "reward_variants.json").read_text(encoding="utf-8"))["figures"]
    # the grid: each batch size by each learning rate from each seed, the steps from the flag
    grid = [(bs, lr, seed) for bs in (1, 2) for lr in ("0.001", "0.002") for seed in (0, 1)]
    seed0 = rv["rows"][0]["seed"]
    assert [(r["batch_size"], r["lr"], r["seed"] - seed0) for r in rv["rows"]] == grid
    assert {r["steps"] for r in rv["rows"]} == {2}
    assert "Gap to bag-of-words over the 8 rows" in rv["caption"]
    # the passes the kept step made: twice the prompts a step, twice the passes
    one, two = rv["rows"][0], rv["rows"][4]
    assert one["kept_step"] == two["kept_step"] > 0
    assert float(two["passes"]) == pytest.approx(2 * float(one["passes"]), abs=0.1)
    assert float(one["passes"]) > 0
    rr = json.loads((tmp_path / "reward_residual.json").read_text(encoding="utf-8"))["figures"]
    assert [r["model"].split(" ")[0] for r in rr["rows"]] == [
        "reward",
        "bag-of-words",
        "its",
        "bag-of-words",
    ]
    ev = load("critic_ev.py")
    fig = json.loads((tmp_path / "critic_ev.json").read_text(encoding="utf-8"))["figures"]
    assert [r["step"] for r in fig["rows"]] == [1, 3] and fig["step_episodes"] == 16
    logged = {h["step"]: h["rl/explained_variance"] for h in fig["history"]}
    assert sorted(logged) == [1, 2, 3]
    for r in fig["rows"]:
        assert r["logged_ev"] == logged[r["step"]]
        assert r["ev_gae"] <= 1 and r["ev_mc"] <= 1 and r["ev_gae_sd_step"] > 0
        assert r["var_within"] >= 0 and r["var_returns"] > 0 and r["ceiling_mc_se"] > 0
        assert -3 * r["ceiling_mc_se"] <= r["ceiling_mc"] <= 1, r
        assert r["ceiling"] == f"{r['ceiling_mc']:.3f} ± {r['ceiling_mc_se']:.3f}"
        assert (
            r["ev_gae_se"] > 0 and r["ev_gae_text"] == f"{r['ev_gae']:.3f} ± {r['ev_gae_se']:.3f}"
        )
    # measuring between steps leaves the training run the stage's own, metric for metric (up
    # to float rounding: another sampled token would move them by far more)
    diff = fig["stage_max_abs_diff"]
    assert set(diff) == set(ev.LOGGED) and max(diff.values()) < 1e-4, diff
    assert fig["stage_same_through"] == 3 and "is the stage's logged run (" in fig["caption"]
    capsys.readouterr()


def test_critic_ev_measures_step_one_and_every_nth_step_from_ten():
    ev = load("critic_ev.py")
    assert ev.steps_to_measure(None, 40) == [1, 10, 20, 30, 40]
    assert ev.steps_to_measure(None, 14, 1) == [1, 10, 11, 12, 13, 14]
    assert ev.steps_to_measure(None, 5, 1) == [1]
    assert ev.steps_to_measure([3, 1, 3], 5) == [1, 3]
    with pytest.raises(SystemExit, match="outside steps 1..5"):
        ev.steps_to_measure([6], 5)


def test_critic_ev_bootstrap_se_matches_the_spread_over_fresh_batches():
    """The EV's bootstrap SE on one batch of episodes is the SD of the EV over independent
    batches of that size (ragged masks, returns correlated within an episode)."""
    ev = load("critic_ev.py")
    gen = torch.Generator().manual_seed(0)

    def batch(n: int = 256, width: int = 12):
        lengths = torch.randint(3, width + 1, (n,), generator=gen)
        mask = (torch.arange(width)[None] < lengths[:, None]).float()
        episode = torch.randn(n, 1, generator=gen)  # shared by an episode's tokens
        values = torch.randn(n, width, generator=gen) + episode
        returns = values + 0.8 * torch.randn(n, width, generator=gen) + 0.6 * episode
        return values, returns, mask

    spread = np.std([ev.core.explained_variance(*batch()) for _ in range(400)], ddof=1)
    boot = np.mean([ev.ev_bootstrap_se(*batch(), draws=300, seed=i) for i in range(8)])
    assert boot == pytest.approx(spread, rel=0.25), (boot, spread)


def pairs_of_returns(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two returns from each of n states: G = f(s) + ε, Var f = 3, ε's SD varying with s
    (E[Var(ε|s)] = 1) and skewed, so the ceiling Var f / Var G is 3/4."""
    f = rng.normal(0.0, np.sqrt(3.0), n)
    sd = np.sqrt(2.0 * rng.uniform(0.0, 1.0, n))  # E[sd²] = 1
    noise = rng.exponential(1.0, (2, n)) - 1.0  # mean 0, variance 1
    return f + sd * noise[0], f + sd * noise[1]


def test_critic_ev_ceiling_estimator_recovers_the_closed_form():
    """`mc_ceiling` on synthetic pairs: the within-state and total variances and the ceiling
    of the closed form; its bootstrap SE is the spread of the estimate over replications."""
    ev = load("critic_ev.py")
    rng = np.random.default_rng(0)
    ceiling, within, total = ev.mc_ceiling(*pairs_of_returns(rng, 400_000))
    assert abs(within - 1.0) < 0.02 and abs(total - 4.0) < 0.04 and abs(ceiling - 0.75) < 0.005
    reps = np.array([ev.mc_ceiling(*pairs_of_returns(rng, 256))[0] for _ in range(400)])
    assert abs(reps.mean() - 0.75) < 0.01  # unbiased to well within one SE (about 0.03)
    se = np.mean([ev.bootstrap_se(*pairs_of_returns(rng, 256), 400, s) for s in range(40)])
    assert 0.8 < se / reps.std() < 1.25, (se, reps.std())
    same = rng.normal(size=64)
    assert ev.mc_ceiling(same, same)[0] == 1.0  # returns the state fixes: all explainable
    noise = rng.normal(size=(2, 100_000))
    assert abs(ev.mc_ceiling(noise[0], noise[1])[0]) < 0.02  # nothing the state tells


def test_critic_ev_mc_returns_are_score_minus_beta_times_kl_to_go():
    ev = load("critic_ev.py")
    from lmpipe.rl import core

    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(6)[None] < torch.tensor([[6], [3], [1]])
    k1 = torch.randn(3, 6, generator=gen) * mask
    scores, beta = torch.tensor([1.5, -2.0, 0.3]), 0.2
    got = ev.mc_returns(core.token_rewards(scores, k1, mask, beta), mask, 1.0)
    to_go = k1.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(got, (scores[:, None] - beta * to_go) * mask)
    values = torch.randn(3, 6, generator=gen)
    blocks = ev.sub_batch_ev(values.repeat(2, 1), got.repeat(2, 1), mask.repeat(2, 1), 3)
    assert blocks == [core.explained_variance(values, got, mask)] * 2


def test_beta_sweep_variants_and_overrides():
    """`--variant NAME:K=V,K=V` parses to its overrides, which nest under rl and leave the
    defaults they start from untouched; a malformed one is refused with the form to use."""
    sweep = load("beta_sweep.py")
    assert sweep.parse_variant("2x batch:rl.prompts_per_step=64, rl.ppo.clip=0.1") == (
        "2x batch",
        ["rl.prompts_per_step=64", "rl.ppo.clip=0.1"],
    )
    assert sweep.parse_variant("default:") == ("default", [])
    for bad in ("no colon", ":rl.lr=1", "x:rl.lr"):
        with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
            sweep.parse_variant(bad)
    base = {"rl": {"lr": 1e-4, "ppo": {"clip": 0.2}}}
    out = sweep.with_overrides(base, ["rl.lr=5e-5", "rl.ppo.clip=0.1", "steps=80"])
    assert out["rl"] == {"lr": 5e-5, "ppo": {"clip": 0.1}, "steps": 80}
    assert base == {"rl": {"lr": 1e-4, "ppo": {"clip": 0.2}}}
    assert sweep.run_name(0.5, 1, ["rl.lr=5e-5"]) == "beta0.5-seed1-rl.lr=5e-5"


def test_beta_sweep_gold_gap_keeps_the_shared_prompts_error():
    """Over seeds that share the eval prompts, the gap's SE is never below one run's paired SE
    (the prompts' sampling does not average down), adds the spread over seeds, and is one
    run's own SE for one seed."""
    sweep = load("beta_sweep.py")
    assert sweep.paired_gap([0.1], [0.03]) == pytest.approx((0.1, 0.03))
    gap, se = sweep.paired_gap([0.1, 0.1, 0.1], [0.03, 0.03, 0.03])
    assert (gap, se) == pytest.approx((0.1, 0.03))
    gap, se = sweep.paired_gap([0.0, 0.2], [0.03, 0.04])
    assert gap == pytest.approx(0.1)
    assert se == pytest.approx(np.sqrt((0.03**2 + 0.04**2) / 2 + 0.02 / 2))
