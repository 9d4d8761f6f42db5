"""RL on a real pretrained model: SmolLM2-135M-Instruct on params/smollm2-cpu.yaml (the default
task: VADER sentiment gold), with a longer RL run than the test's, through `dvc repro rl` in a
scratch copy of the repo. Prints gold, proxy and KL to the SFT policy per step and the stage's
final evaluation, as a Markdown table.

    python bench/smollm2_rl.py [--steps 16] [--prompts-per-step 8] [--workdir /tmp/smollm2-rl]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from _results import add_json_arg, stage_env, write

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import copy_repo, merge  # noqa: E402
from lmpipe.base import fetch_smollm2  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--samples-per-prompt", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--pref-prompts", type=int, default=96, help="prompts labelled for the RM")
    ap.add_argument("--reward-steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--algo", default="ppo", choices=["ppo", "rloo", "dpg"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/smollm2-rl"))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lmpipe")
    add_json_arg(ap)
    args = ap.parse_args()

    gguf = fetch_smollm2(args.cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    profile = yaml.safe_load((ROOT / "params" / "smollm2-cpu.yaml").read_text())
    profile = merge(
        profile,
        {
            "data": {"rl_prompts": max(args.steps * args.prompts_per_step, args.pref_prompts)},
            "preference": {"prompts": args.pref_prompts, "max_new_tokens": args.max_new_tokens},
            "reward": {
                "max_steps": args.reward_steps,
                "batch_size": 8,
                "eval_every": 20,
                "norm_samples": 64,
            },
            "rl": {
                "steps": args.steps,
                "prompts_per_step": args.prompts_per_step,
                "samples_per_prompt": args.samples_per_prompt,
                "algo": args.algo,
                "max_new_tokens": args.max_new_tokens,
                "lr": args.lr,
                "eval_prompts": 8,
                "eval_samples": 4,
                "minibatch_size": 8,
            },
            "tracking": {"enabled": False},
        },
    )
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    repo = copy_repo(args.workdir, profile)
    (repo / profile["base"]["model"]).symlink_to(gguf)
    env = stage_env(LMPIPE_LOG_LEVEL="WARNING")
    t0 = time.perf_counter()
    subprocess.run(["dvc", "repro", "rl"], cwd=repo, env=env, check=True)
    seconds = time.perf_counter() - t0

    rm = json.loads((repo / "reports" / "reward.json").read_text())
    rows = list(csv.DictReader((repo / "reports" / "plots" / "rl.csv").open()))
    print(
        f"SmolLM2-135M-Instruct, {args.algo}, {args.steps} steps x {args.prompts_per_step} "
        f"prompts x {args.samples_per_prompt} samples, lr {args.lr}; dvc repro rl "
        f"{seconds / 60:.1f} min on {os.cpu_count()} cores ({platform.processor() or 'cpu'})"
    )
    print(
        f"reward model: val accuracy {rm['val_accuracy']:.3f} on {rm['pairs']['val']} pairs, "
        f"gold-order accuracy {rm['gold_order_accuracy']:.3f} (bag of words "
        f"{rm['baseline_bow_gold_order_accuracy']:.3f})"
    )
    print("\n| step | gold | proxy | KL (nats) |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['step']} | {float(r['rl/gold']):.3f} | {float(r['rl/proxy']):.3f} "
            f"| {float(r['rl/kl']):.3f} |"
        )
    rep = json.loads((repo / "reports" / "rl.json").read_text())
    g, p, j = rep["gold_reward"], rep["proxy_reward"], rep["objective_j"]
    print(
        f"\nheld-out eval ({rep['eval_prompts']} prompts x 4 samples), SFT -> RL: gold "
        f"{g['init']:.3f} -> {g['final']:.3f}, proxy {p['init']:.3f} -> {p['final']:.3f}, "
        f"J {j['init']:.3f} -> {j['final']:.3f}; KL to SFT {rep['kl_to_ref']:.3f} nats"
    )
    caption = (
        f"Reward model: val accuracy {rm['val_accuracy']:.3f} on {rm['pairs']['val']} pairs, "
        f"gold-order accuracy {rm['gold_order_accuracy']:.3f} (bag-of-words "
        f"{rm['baseline_bow_gold_order_accuracy']:.3f}). Held-out eval "
        f"({rep['eval_prompts']} prompts × 4 samples), SFT → RL: gold {g['init']:.3f} → "
        f"{g['final']:.3f}, proxy {p['init']:.3f} → {p['final']:.3f}, J {j['init']:.3f} → "
        f"{j['final']:.3f}; KL to SFT {rep['kl_to_ref']:.3f} nats. `dvc repro rl` took "
        f"{seconds / 60:.1f} min."
    )
    steps = [
        {
            "step": int(r["step"]),
            "gold": float(r["rl/gold"]),
            "proxy": float(r["rl/proxy"]),
            "kl": float(r["rl/kl"]),
        }
        for r in rows
    ]
    write(args.json, {"caption": caption, "rows": steps})


if __name__ == "__main__":
    main()
