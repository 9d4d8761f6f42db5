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
from pathlib import Path

from _results import add_json_arg, write
from beta_sweep import base_params, fmt, mean_se, run_all

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
    base = base_params()

    def params(k: int, seed: int) -> dict:
        rl = {**base["rl"], "algo": "rloo", "samples_per_prompt": k}
        rl["prompts_per_step"] = EPISODES // k
        return {**base, "seed": base["seed"] + seed, "rl": rl}

    runs = {(k, s): (f"k{k}-seed{s}", params(k, s)) for k in args.ks for s in range(args.seeds)}

    def summarise(item: tuple[int, int], rep: dict) -> dict:
        beta, kl, j = rep["beta"], rep["kl_to_ref"], rep["objective_j"]["final"]
        run = {
            "score": j + beta * kl,
            "gold": rep["gold_reward"]["final"],
            "kl": kl,
            "j": j,
            "bon_j": max(b["objective_j_lower"] for b in rep["best_of_n"]),
        }
        print(f"k {item[0]} seed {item[1]}: {run}", flush=True)
        return run

    done = run_all(args.workdir, runs, args.jobs, summarise)
    rows = []
    print("| k | prompts a step | RL reward | gold | KL | J | best-of-n's best J bound |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in args.ks:
        runs = [done[(k, s)] for s in range(args.seeds)]
        m = {key: mean_se([r[key] for r in runs]) for key in runs[0]}
        row = {
            "k": k,
            "prompts": EPISODES // k,
            "score": fmt(m["score"]),
            "gold": fmt(m["gold"]),
            "kl": fmt(m["kl"], 2),
            "j": fmt(m["j"]),
            "bon_j": f"{m['bon_j'][0]:.3f}",
        }
        rows.append(row)
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    steps = base["rl"]["steps"]
    caption = f"Mean ± SE over {args.seeds} seeds; {EPISODES} episodes a step, {steps} steps."
    write(args.json, {"seeds": args.seeds, "caption": caption, "rows": rows})


if __name__ == "__main__":
    main()
