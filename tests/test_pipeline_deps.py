"""The DVC graph reruns exactly what a change affects: params sections and selective reruns."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run
from lmpipe.pipeline import stage_outputs, within

STAGES = ["prepare", "pretrain", "sft", "reward", "rl", "compress", "export", "evaluate"]


def sections_read(script: str) -> set[str]:
    """The params sections a stage script loads (tracking aside) and `seed` if it reads it."""
    tree = ast.parse((ROOT / "stages" / f"{script}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_params":
            found |= {e.value for e in node.args[1].elts if isinstance(e, ast.Constant)}
        is_attr = isinstance(node, ast.Attribute)
        if is_attr and node.attr == "seed" and getattr(node.value, "id", None) == "params":
            found.add("seed")
    return found - {"tracking"}


def test_every_stage_lists_exactly_the_params_sections_it_reads():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == STAGES
    for name, stage in dvc.items():
        listed = set(stage.get("params", []))
        assert listed == sections_read(name), (
            f"{name}: dvc.yaml lists {sorted(listed)} but the script reads "
            f"{sorted(sections_read(name))}"
        )


SRC = ROOT / "src"

NEUTRAL = {
    "lmpipe": "raises the log level of noisy third-party loggers",
    "lmpipe.allocator": "whether freed host memory is kept: speed, not results",
    "lmpipe.stage": "the harness: logging, exit codes, the torchrun relaunch",
    "lmpipe.tracking": "MLflow runs and lineage, which are not the stage's outputs",
}
"""Modules a stage imports that cannot change what it writes: not its dependencies. A package
here covers its modules."""


def neutral(name: str) -> bool:
    return name in NEUTRAL or ".".join(name.split(".")[:2]) in NEUTRAL


CONDITIONAL = {
    ("lmpipe.data.sources", "lmpipe.data.builtin"): "corpus",
}
"""Imports made inside a function for one kind of input: the built-in corpus (only read from
corpus/). They count for a stage whose deps list that input."""


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.exists():
            return p
    return None


def imported(path: Path) -> set[str]:
    """lmpipe modules `path` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: a relative import; this walk reads absolute ones only")
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)  # and submodules imported by name:
            found |= {
                f"{node.module}.{a.name}"
                for a in node.names
                if module_file(f"{node.module}.{a.name}")
            }
    names = {n for n in found if n == "lmpipe" or n.startswith("lmpipe.")}
    # importing a.b.c runs the __init__ of a and a.b first
    return names | {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}


def docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) for s in body)


def code_closure(stage: str, deps: list[str]) -> set[str]:
    """Repository paths of the library modules a stage script runs, directly or not."""
    seen: set[str] = set()
    todo = [("", ROOT / "stages" / f"{stage}.py")]
    while todo:
        importer, path = todo.pop()
        for name in imported(path):
            data = CONDITIONAL.get((importer, name))
            if name in seen or neutral(name) or (data and data not in deps):
                continue
            seen.add(name)
            todo.append((name, module_file(name)))
    files = {module_file(n) for n in seen}
    return {str(f.relative_to(ROOT)) for f in files if not docstring_only(f)}


def test_every_stage_lists_exactly_the_library_code_it_runs():
    """A change to a module reruns every stage that runs it, and no other: the modules a
    stage's script imports, directly or through other modules, are its deps (a folder covers
    its modules), and each src/ dep holds at least one of them."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in dvc.items():
        deps = stage["deps"]
        code = code_closure(name, deps)
        listed = [d for d in deps if d.startswith("src/")]
        missing = sorted(f for f in code if not any(within(f, d) for d in listed))
        assert not missing, f"{name} runs {missing} but dvc.yaml does not list them"
        unused = [d for d in listed if not any(within(f, d) for f in code)]
        assert not unused, f"{name} lists {unused} but runs none of it"


def test_code_closure_follows_imports_inside_functions_and_conditional_inputs():
    """The walk sees what a static import list would miss: evaluate's engine imports the
    log-prob pass inside a method, and the built-in corpus is generated through a lazy import of
    data.builtin, which counts only where a stage reads corpus/."""
    evaluate = code_closure("evaluate", ["models/compressed"])
    assert "src/lmpipe/logprobs.py" in evaluate
    assert "src/lmpipe/data/builtin.py" in code_closure("prepare", ["corpus"])
    assert "src/lmpipe/data/builtin.py" not in code_closure("prepare", ["data/raw"])
    assert "src/lmpipe/allocator.py" not in evaluate
    assert not [f for f in evaluate if f.startswith("src/lmpipe/tracking/")]


def stale(repo) -> set[str]:
    """The stages `dvc repro` will run: those `dvc status` names (their own deps changed) and
    every stage downstream of them in dvc.yaml's graph (dvc status lists only the former)."""
    res = run(["dvc", "status", "--json"], repo)
    changed = set(json.loads(res.stdout or "{}"))
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]

    def feeds(a: str, b: str) -> bool:  # an output of a is (inside) a dep of b
        return any(
            within(d, o) for o in stage_outputs(stages[a]) for d in stages[b].get("deps", [])
        )

    grew = True
    while grew:
        more = {b for a in changed for b in stages if b not in changed and feeds(a, b)}
        changed |= more
        grew = bool(more)
    return changed


def set_param(repo, section: str, key: str, value) -> None:
    p = repo / "params.yaml"
    doc = yaml.safe_load(p.read_text())
    doc[section][key] = value
    p.write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.mark.e2e
def test_changing_rl_kl_coef_reruns_rl_and_after_and_nothing_before(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    assert stale(repo) == set(), "the shared tiny repo should be up to date after its repro"
    doc = yaml.safe_load((repo / "params.yaml").read_text())
    set_param(repo, "rl", "kl_coef", doc["rl"]["kl_coef"] * 2)
    assert set(json.loads(run(["dvc", "status", "--json"], repo).stdout)) == {"rl"}
    assert stale(repo) == {"rl", "compress", "export", "evaluate"}
    res = run(["dvc", "repro"], repo, timeout=1800)
    out = res.stdout + res.stderr
    for name in ("prepare", "pretrain", "sft", "reward"):
        assert f"Stage '{name}' didn't change, skipping" in out, name
    for name in ("rl", "compress", "export", "evaluate"):
        assert f"Running stage '{name}'" in out, name
    assert stale(repo) == set()
    set_param(repo, "pretrain", "lr", doc["pretrain"]["lr"] / 2)
    assert set(json.loads(run(["dvc", "status", "--json"], repo).stdout)) == {"pretrain"}
    assert stale(repo) == set(STAGES) - {"prepare"}


@pytest.mark.e2e
def test_a_typo_in_params_keeps_the_stage_reports(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    before = {p: (repo / p).read_bytes() for p in ("reports/sft.json", "reports/plots/sft.csv")}
    set_param(repo, "sft", "lr", -1.0)
    res = run(["dvc", "repro", "sft"], repo, check=False)
    assert res.returncode != 0 and "sft.lr = -1.0" in res.stderr + res.stdout
    assert {p: (repo / p).read_bytes() for p in before} == before
