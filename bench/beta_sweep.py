"""RL against best-of-n across β: the rl stage on the committed SFT and reward models for each
β and seed, compared at matched KL with best-of-n from π₀ on the same eval prompts (ranked by
the RL reward, at its KL bound, from the π₀ samples the stage draws for log Z). Prints a
Markdown table per β: RL's RL reward (proxy), gold, KL and J (mean ± SE over seeds), best-of-n's
reward and gold interpolated at RL's KL, and RL's gold − best-of-n's in standard errors (paired
by eval prompt: `paired_gap`).

    python bench/beta_sweep.py [--betas 0.05 0.1 0.2 0.5] [--seeds 3] [--set rl.steps=80 ...]
                               [--variant "2x batch:rl.prompts_per_step=64" ...]
                               [--workdir /tmp/beta-sweep] [--jobs 2]

`--set` applies to every run; each `--variant "NAME:KEY=VALUE,KEY=VALUE"` adds a row per β with
its overrides on top (`NAME:` alone is the defaults), so one command compares settings on the
same models, prompts and seeds. `--jobs N` runs N stage runs at once, each with 1/N of the cores'
threads. The caption gives,
averaged over the runs, the critic's explained variance (lowest from step 10 on, and median) and
`j_slope_ratio` (J's slope over the last 20% of steps over its mean slope).

Best-of-n's KL is at most its bound, so at a given KL its interpolated reward and gold are
lower estimates of its frontier; RL KLs beyond the largest n's bound are compared with that n.
Needs models/sft, models/reward and data/prepared (after `dvc repro` or `dvc pull`).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import yaml

from _results import add_json_arg, write
from lmpipe.config import load_yaml

ROOT = Path(__file__).resolve().parents[1]


def run_rl(workdir: Path, params: dict, name: str, threads: int | None = None) -> dict:
    out = workdir / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [
        sys.executable,
        "stages/rl.py",
        "--params",
        str(out / "params.yaml"),
        "--sft",
        "models/sft",
        "--reward",
        "models/reward",
        "--data",
        "data/prepared",
        "--out",
        str(out / "model"),
        "--report",
        str(out / "rl.json"),
        "--plots",
        str(out / "rl.csv"),
        "--cache",
        str(out / "cache"),
    ]
    with (out / "log").open("w") as log:
        subprocess.run(
            cmd,
            cwd=ROOT,
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "LMPIPE_PROGRESS_S": "60",
                **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
            },
        )
    rep = json.loads((out / "rl.json").read_text())
    with (out / "rl.csv").open() as f:  # only PPO has a critic
        ev = [
            float(r["rl/explained_variance"])
            for r in csv.DictReader(f)
            if r.get("rl/explained_variance")
        ]
    nan = float("nan")
    rep["ev"] = {
        "min_from_10": min(ev[9:]) if len(ev) > 9 else nan,
        "median": median(ev) if ev else nan,
    }
    return rep


def at_kl(best: list[dict], key: str, kl: float) -> float:
    """Best-of-n's `key` interpolated at `kl` along its (KL bound, value) points."""
    xs = [b["kl_bound"] for b in best]
    return float(np.interp(kl, xs, [b[key] for b in best]))


def mean_se(x: list[float]) -> tuple[float, float]:
    a = np.asarray(x, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")


def paired_gap(gaps: list[float], ses: list[float]) -> tuple[float, float]:
    """RL's gold over best-of-n's, the mean over seeds of each run's gap paired by eval prompt,
    and its standard error: the seeds share the eval prompts, so the prompts' sampling error
    does not average down over seeds (the runs' own SEs, mean square) and adds to the spread
    over seeds (whose SE does). Counts the policy's sampling noise twice: conservative."""
    g, s = np.asarray(gaps, dtype=float), np.asarray(ses, dtype=float)
    spread = g.var(ddof=1) / g.size if g.size > 1 else 0.0
    return float(g.mean()), float(np.sqrt(np.mean(s**2) + spread))


def fmt(m: tuple[float, float], digits: int = 3) -> str:
    """mean ± SE; the mean alone for one seed."""
    return f"{m[0]:.{digits}f}" + (f" ± {m[1]:.{digits}f}" if np.isfinite(m[1]) else "")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """ "NAME:KEY=VALUE,KEY=VALUE" → (NAME, ["KEY=VALUE", ...]); "NAME:" is the defaults."""
    name, colon, rest = text.partition(":")
    sets = [s.strip() for s in rest.split(",") if s.strip()]
    if not colon or not name.strip() or any("=" not in s for s in sets):
        raise ValueError(f"--variant {text!r}: use NAME:KEY=VALUE,KEY=VALUE (or NAME: alone)")
    return name.strip(), sets


def with_overrides(params: dict, sets: list[str]) -> dict:
    """A copy of params with each "rl.KEY=VALUE" (rl.ppo.clip=0.1: a nested key) set, the value
    read as YAML."""
    out = copy.deepcopy(params)
    for s in sets:
        key, eq, value = s.partition("=")
        if not eq:
            raise ValueError(f"override {s!r}: use KEY=VALUE")
        *path, leaf = key.removeprefix("rl.").split(".")
        node = out["rl"]
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = load_yaml(value)
    return out


def run_name(beta: float, seed: int, sets: list[str]) -> str:
    """The run's folder: its overrides in the name, so a run with other params never overwrites
    this one's."""
    return f"beta{beta}-seed{seed}" + "".join(f"-{o}".replace("/", "_") for o in sets)


def base_params() -> dict:
    """params.yaml with tracking off: the runs' starting point."""
    base = load_yaml((ROOT / "params.yaml").read_text())
    base["tracking"]["enabled"] = False
    return base


def run_all(
    workdir: Path,
    runs: dict[Any, tuple[str, dict]],
    jobs: int,
    summarise: Callable[[Any, dict], Any],
) -> dict[Any, Any]:
    """`run_rl` for each key's (name, params), `jobs` at once, each on 1/jobs of the cores'
    threads (on a small CPU single-threaded runs use the cores better than one run's threads);
    `summarise(key, report)` runs as each finishes, and its results come back by key."""
    jobs = max(1, jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None

    def one(key: Any) -> Any:
        name, params = runs[key]
        return summarise(key, run_rl(workdir, params, name, threads))

    with ThreadPoolExecutor(jobs) as pool:
        return dict(zip(runs, pool.map(one, runs), strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="rl param override key=value")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:KEY=VALUE,KEY=VALUE — a row per β with these rl overrides on top of --set",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/beta-sweep"))
    ap.add_argument("--jobs", type=int, default=1, help="stage runs at once")
    add_json_arg(ap)
    args = ap.parse_args()
    try:
        variants = [parse_variant(v) for v in args.variant] or [("", [])]
        base = with_overrides(base_params(), args.set)
        bases = {name: with_overrides(base, sets) for name, sets in variants}
    except ValueError as e:
        ap.error(str(e))
    t0 = time.time()
    runs = {}
    for name, sets in variants:
        p = bases[name]
        for beta in args.betas:
            for seed in range(args.seeds):
                runs[(name, beta, seed)] = (
                    run_name(beta, seed, args.set + sets),
                    {**p, "seed": p["seed"] + seed, "rl": {**p["rl"], "kl_coef": beta}},
                )

    def summarise(item: tuple[str, float, int], rep: dict) -> dict:
        name, beta, seed = item
        best = rep["best_of_n"]
        kl = rep["kl_to_ref"]
        j = rep["objective_j"]["final"]
        run = {
            "score": j + beta * kl,
            "gold": rep["gold_reward"]["final"],
            "kl": kl,
            "j": j,
            "bon_score": at_kl(best, "score", kl),
            "bon_gold": at_kl(best, "gold", kl),
            "bon_j": max(b["objective_j_lower"] for b in best),
            "posterior_kl": rep["posterior_kl"],
        }
        extra = {
            "ev_min": rep["ev"]["min_from_10"],
            "ev_median": rep["ev"]["median"],
            "j_slope": rep["j_slope_ratio"],
            "bon_js": {b["n"]: b["objective_j_lower"] for b in best},
            # paired by eval prompt in the stage's report (`gold_vs_best_of_n`)
            "gold_vs_bon": rep["gold_vs_best_of_n"],
            "gold_vs_bon_se": rep["gold_vs_best_of_n_se"],
        }
        label = f"{name}, " if name else ""
        print(f"{label}β {beta} seed {seed}: {json.dumps({**run, **extra})}", flush=True)
        return {"run": run, "extra": extra}

    done = run_all(args.workdir, runs, args.jobs, summarise)
    table = []
    extras = [d["extra"] for d in done.values()]
    for name, beta, seed in done:
        if seed:
            continue  # one row per (variant, β), over its seeds
        runs = [done[(name, beta, s)]["run"] for s in range(args.seeds)]
        row = {"variant": name, "beta": beta}
        for key in runs[0]:
            row[key] = mean_se([r[key] for r in runs])
        gaps = [done[(name, beta, s)]["extra"] for s in range(args.seeds)]
        row["gold_gap"] = paired_gap(
            [g["gold_vs_bon"] for g in gaps], [g["gold_vs_bon_se"] for g in gaps]
        )
        table.append(row)
    cpu = platform.processor() or platform.machine()
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({cpu}), "
        f"{args.seeds} seeds a β, {time.time() - t0:.0f} s\n"
    )
    named = any(name for name, _ in variants)
    print(
        ("| variant " if named else "")
        + "| β | RL reward | best-of-n at RL's KL | gold | best-of-n gold | gold − bon (SE) "
        "| KL | J | best J bound of best-of-n | KL(π‖π*) |"
    )
    print(("|---" if named else "") + "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for r in table:
        gap, se = r["gold_gap"]
        rows.append(
            {
                **({"variant": r["variant"]} if named else {}),
                "beta": r["beta"],
                "score": fmt(r["score"]),
                "bon_score": f"{r['bon_score'][0]:.3f}",
                "gold": fmt(r["gold"]),
                "bon_gold": f"{r['bon_gold'][0]:.3f}",
                "gold_gap": f"{gap:+.3f}"
                + (f" ({gap / se:+.1f})" if se and np.isfinite(se) else ""),
                "kl": fmt(r["kl"], 2),
                "j": fmt(r["j"]),
                "bon_j": f"{r['bon_j'][0]:.3f}",
                "posterior_kl": fmt(r["posterior_kl"], 2),
            }
        )
        print("| " + " | ".join(str(v) for v in rows[-1].values()) + " |")
    caption = (
        (f"Mean ± SE over {args.seeds} seeds a β" if args.seeds > 1 else "One seed")
        + f"; overrides: {', '.join(args.set) or 'none'}"
        + "".join(
            f"; {name}: {', '.join(sets) or 'the defaults'}" for name, sets in variants if name
        )
        + ". "
        + (f"Over the {len(extras)} runs" if len(extras) > 1 else "In the run")
        + ": the critic's explained variance from step 10 on, lowest "
        f"{np.mean([e['ev_min'] for e in extras]):.2f} and median "
        f"{np.mean([e['ev_median'] for e in extras]):.2f}"
        + (" (means over runs)" if len(extras) > 1 else "")
        + "; `j_slope_ratio` "
        f"{np.mean([e['j_slope'] for e in extras]):.2f}."
    )
    if len(extras) == 1:
        bounds = extras[0]["bon_js"]
        caption += (
            " Best-of-n's J bounds on these prompts: "
            + ", ".join(f"best-of-{n} {bounds[n]:.3f}" for n in sorted(bounds) if n in (4, 8, 16))
            + "."
        )
    write(
        args.json,
        {
            "seeds": args.seeds,
            "overrides": args.set,
            "variants": {name: sets for name, sets in variants},
            "caption": caption,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
