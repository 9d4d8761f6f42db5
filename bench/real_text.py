"""The default pipeline on real text it did not make: ../shared/corpora/tinyshakespeare.txt with
`data.source: text` and every other param at its default, through `dvc repro` in a scratch copy
of the repo. Prints, as Markdown, what decides whether alignment carried over: the reward model
against its bag-of-words baseline (with standard errors by prompt), the RL gold and proxy gains
(with standard errors over the eval prompts) at their KL, the stage times, and the report
card's flags.

    python bench/real_text.py [--corpus ../shared/corpora/tinyshakespeare.txt]
                              [--set rl.steps=80 ...] [--workdir /tmp/real-text]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _results import add_json_arg, stage_env, write
from lmpipe.config import load_yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import SHARED_CORPORA, copy_repo, merge  # noqa: E402
from rl_report import table  # noqa: E402


def override(dotted: str) -> dict:
    """`a.b=value` as {"a": {"b": value}} (the value parsed as YAML)."""
    key, _, value = dotted.partition("=")
    out: dict = {}
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = load_yaml(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=SHARED_CORPORA / "tinyshakespeare.txt")
    ap.add_argument("--set", action="append", default=[], help="param override a.b=value")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/real-text"))
    add_json_arg(ap)
    args = ap.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"{args.corpus} is missing: this check reads ../shared/corpora beside the repo")

    params = {
        "data": {"source": "text", "path": str(args.corpus.resolve())},
        "tracking": {"enabled": False},
    }
    for s in args.set:
        params = merge(params, override(s))
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    repo = copy_repo(args.workdir, params)
    env = stage_env()
    t0 = time.perf_counter()
    log = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    minutes = (time.perf_counter() - t0) / 60
    if log.returncode:
        sys.exit(
            f"dvc repro failed ({log.returncode}):\n{log.stdout[-3000:]}\n{log.stderr[-3000:]}"
        )

    def report(name: str) -> dict:
        return json.loads((repo / "reports" / f"{name}.json").read_text())

    prep, rm, rl, card = report("prepare"), report("reward"), report("rl"), report("metrics")
    import torch

    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; `dvc repro` {minutes:.1f} min; "
        f"overrides: {', '.join(args.set) or 'none'}\n"
    )
    print(f"{caption(prep, args.set)}\n")
    print("| figure | value |\n|---|---|")
    rows = [
        ("reward: val accuracy", f"{rm['val_accuracy']:.3f} ± {rm.get('val_accuracy_se', 0):.3f}"),
        (
            "reward: gold-order accuracy",
            f"{rm['gold_order_accuracy']:.3f} ± {rm.get('gold_order_accuracy_se', 0):.3f}",
        ),
        ("bag-of-words: gold-order accuracy", f"{rm['baseline_bow_gold_order_accuracy']:.3f}"),
        (
            "reward − bag-of-words (paired)",
            f"{rm.get('gold_order_gap_to_baseline', float('nan')):+.3f} ± "
            f"{rm.get('gold_order_gap_to_baseline_se', float('nan')):.3f}",
        ),
        (
            "reward: pairs (train / val), val prompts",
            f"{rm['pairs']['train']} / {rm['pairs']['val']}, {rm.get('val_prompts', '?')}",
        ),
        ("reward: kept step", str(rm.get("kept_step"))),
        ("RL gold gain", f"{rl['gold_gain']:+.3f} ± {rl['gold_gain_se']:.3f}"),
        ("RL proxy gain", f"{rl['proxy_gain']:+.3f} ± {rl['proxy_gain_se']:.3f}"),
        ("RL KL to SFT (nats)", f"{rl['kl_to_ref']:.2f}"),
        (
            "RL objective J (init → final)",
            f"{rl['objective_j']['init']:.3f} → {rl['objective_j']['final']:.3f}",
        ),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    times = re.findall(r"Running stage '(\w+)'", log.stdout)
    print(f"\nStages run: {', '.join(times)}.\n\nFlags:\n")
    for f in card["flags"] or ["none"]:
        print(f"- {f}")
    write(args.json, {"caption": caption(prep, args.set), "rows": table(repo / "reports")})


def caption(prep: dict, overrides: list[str]) -> str:
    """The corpus's size and where its RL prompts came from (`reports/prepare.json`)."""
    prompts = prep["prompts"]
    borrowed = prompts.get("rl_from_train", 0)
    source = (
        f" ({prompts['rl'] - borrowed} from val documents, {borrowed} from train documents: "
        "`data.rl_prompts_min`)"
        if borrowed
        else ""
    )
    return (
        f"Corpus: {prep['documents']['train']:,} train documents ({prep['tokens']['train']:,} "
        f"tokens), {prompts['rl']} RL prompts{source}; overrides: {', '.join(overrides) or 'none'}."
    )


if __name__ == "__main__":
    main()
