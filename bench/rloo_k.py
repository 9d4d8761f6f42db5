"""RLOO's samples per prompt k at a fixed episode budget: the rl stage with `rl.algo: rloo` on
the committed SFT and reward models, k samples for each of 64/k prompts a step (the same 64
episodes a step, 40 steps), against best-of-n on the same eval prompts. A larger k gives each
sample a baseline from more of its siblings (lower-variance advantages) but sees fewer prompts.

    python bench/rloo_k.py [--ks 2 4] [--seeds 2] [--jobs 2] [--workdir /tmp/rloo-k]

Prints one row per k: RL reward, gold, KL to SFT and J (mean ± SE over seeds), and best-of-n's
best J bound on the same prompts. Needs models/sft, models/reward and data/prepared.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from _results import add_json_arg, write
from beta_sweep import ROOT, mean_se, run_rl

EPISODES = 64  # a step's episodes at the default (32 prompts × 2 samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1, help="stage runs at once")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rloo-k"))
    add_json_arg(ap)
    args = ap.parse_args()
    if any(k < 2 or EPISODES % k for k in args.ks):
        ap.error(f"every k must be ≥ 2 and divide {EPISODES}")
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["tracking"]["enabled"] = False
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    todo = [(k, seed) for k in args.ks for seed in range(args.seeds)]

    def one(item: tuple[int, int]) -> dict:
        k, seed = item
        rl = {**base["rl"], "algo": "rloo", "samples_per_prompt": k}
        rl["prompts_per_step"] = EPISODES // k
        params = {**base, "seed": base["seed"] + seed, "rl": rl}
        rep = run_rl(args.workdir, params, f"k{k}-seed{seed}", threads)
        beta, kl, j = rep["beta"], rep["kl_to_ref"], rep["objective_j"]["final"]
        run = {
            "score": j + beta * kl,
            "gold": rep["gold_reward"]["final"],
            "kl": kl,
            "j": j,
            "bon_j": max(b["objective_j_lower"] for b in rep["best_of_n"]),
        }
        print(f"k {k} seed {seed}: {run}", flush=True)
        return run

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        done = dict(zip(todo, pool.map(one, todo), strict=True))
    rows = []
    print("| k | prompts a step | RL reward | gold | KL | J | best-of-n's best J bound |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in args.ks:
        runs = [done[(k, s)] for s in range(args.seeds)]
        m = {key: mean_se([r[key] for r in runs]) for key in runs[0]}
        row = {
            "k": k,
            "prompts": EPISODES // k,
            **{key: f"{m[key][0]:.3f} ± {m[key][1]:.3f}" for key in ("score", "gold")},
            "kl": f"{m['kl'][0]:.2f} ± {m['kl'][1]:.2f}",
            "j": f"{m['j'][0]:.3f} ± {m['j'][1]:.3f}",
            "bon_j": f"{m['bon_j'][0]:.3f}",
        }
        rows.append(row)
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    steps = base["rl"]["steps"]
    caption = f"Mean ± SE over {args.seeds} seeds; {EPISODES} episodes a step, {steps} steps."
    write(args.json, {"seeds": args.seeds, "caption": caption, "rows": rows})


if __name__ == "__main__":
    main()
