"""The bench/ scripts stay runnable: each imports and parses `--help`, the training bench's
profile runs on a small shape, and BENCHMARKS.md is what `bench/all.py` renders from the
committed bench/results. (Their figures are printed, never asserted: see README.)"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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
    """The tokenizer bench on a tiny corpus and the two report readers, through `--json`."""
    all_ = load("all.py")
    runs = {
        "tokenizer": ["tokenizer_throughput.py", "--stories", "200", "--vocab", "512"],
        "pipeline": ["pipeline_report.py"],
        "rl_report": ["rl_report.py"],
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


def test_sampling_bench_skips_a_compile_that_takes_too_long(tmp_path, monkeypatch, capsys):
    """A compiled engine past `--compile-timeout` is skipped with the reason; the rest run."""
    out = tmp_path / "s.json"
    argv = ["--shape", "tiny", "--batch", "2", "--new-tokens", "3", "--repeats", "1"]
    argv += ["--engines", "lmpipe", "hf-compile", "--compile-timeout", "0.05", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["bench/sampling_throughput.py", *argv])
    load("sampling_throughput.py").main()
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
        ],
    }
    for section, argv in runs.items():
        out = tmp_path / f"{section}.json"
        monkeypatch.setattr(sys, "argv", [f"bench/{argv[0]}", *argv[1:], "--json", str(out)])
        load(argv[0]).main()
        assert json.loads(out.read_text(encoding="utf-8"))["figures"]["rows"], section
    capsys.readouterr()
