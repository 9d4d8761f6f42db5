"""The DVC graph reruns exactly what a change affects: params sections and selective reruns."""

from __future__ import annotations

import ast
import json
import shutil

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
