"""The reward stage with more preference prompts: does the reward model close its gap to the
bag-of-words baseline with more data, or does the baseline gain as much?

    python bench/reward_data.py --prompts 1000 2000

For each count N the reward stage runs on the SFT model with `preference.prompts: N` and the
prepared data's RL prompts extended to N as `data.rl_prompts_min: N` would extend them (the
training documents' prompts, in order, after the held-out ones), so only the reward stage's
input changes: the tokenizer, the SFT model and its training data stay those of the last
`dvc repro`. Rows: the pairs, the reward model's gold-order accuracy (± SE by prompt), the
bag-of-words and bag-of-tokens baselines on the same pairs, and the paired gap (± SE).
Tracking is off; nothing in the workspace is written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _results import add_json_arg, write
from lmpipe.config import load_yaml
from lmpipe.data import sft
from lmpipe.io import read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def extend_prompts(prepared: Path, out: Path, n: int) -> int:
    """A copy of `prepared` whose prompts/rl.jsonl holds up to `n` prompts, topped up from
    sft/train.jsonl as prepare tops them up (`sft.fill_prompts`). Returns how many it holds."""
    shutil.copytree(prepared, out)
    path = out / "prompts" / "rl.jsonl"
    rows = sft.fill_prompts(read_jsonl(path), read_jsonl(out / "sft" / "train.jsonl"), n)
    write_jsonl(path, rows)
    return len(rows)


def run_reward(params: dict, sft: Path, prepared: Path, out: Path) -> dict:
    """The reward stage in `out` (params, pairs, model, report); its report."""
    out.mkdir(parents=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    argv = [sys.executable, str(ROOT / "stages" / "reward.py"), "--params", "params.yaml"]
    argv += ["--model", str(sft.resolve()), "--data", str(prepared.resolve())]
    argv += ["--pairs", "pairs", "--out", "model", "--report", "reward.json"]
    argv += ["--plots", "reward.csv", "--cache", "cache"]
    with open(out / "log.txt", "w", encoding="utf-8") as log:
        rc = subprocess.run(argv, cwd=out, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = (out / "log.txt").read_text(encoding="utf-8").splitlines()[-20:]
        raise SystemExit(f"the reward stage failed (exit {rc}):\n" + "\n".join(tail))
    return json.loads((out / "reward.json").read_text(encoding="utf-8"))


def pm(value: float, se: float | None) -> str:
    return f"{value:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--sft", type=Path, default=ROOT / "models" / "sft")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "prepared")
    add_json_arg(ap)
    args = ap.parse_args()

    base = load_yaml(args.params.read_text(encoding="utf-8"))
    base.setdefault("tracking", {})["enabled"] = False
    rows = []
    with tempfile.TemporaryDirectory(prefix="reward_data-") as tmp:
        for n in args.prompts:
            t0 = time.perf_counter()
            prepared = Path(tmp) / f"prepared-{n}"
            have = extend_prompts(args.data, prepared, n)
            params = {**base, "preference": {**base.get("preference", {}), "prompts": n}}
            r = run_reward(params, args.sft, prepared, Path(tmp) / f"reward-{n}")
            row = {
                "prompts": min(n, have),
                "pairs": f"{r['pairs']['train']:,} / {r['pairs']['val']:,}",
                "gold_order": pm(r["gold_order_accuracy"], r.get("gold_order_accuracy_se")),
                "bow": r["baseline_bow_gold_order_accuracy"],
                "tokens": r["baseline_tokens_gold_order_accuracy"],
                "gap": pm(r["gold_order_gap_to_baseline"], r.get("gold_order_gap_to_baseline_se")),
                "val_accuracy": pm(r["val_accuracy"], r.get("val_accuracy_se")),
                "kept_step": r["kept_step"],
                "seconds": f"{r['sample_seconds']:.0f} / {r['train_seconds']:.0f}",
            }
            rows.append(row)
            print(
                f"{row['prompts']} prompts ({row['pairs']} pairs): gold-order {row['gold_order']}, "
                f"bag of words {row['bow']:.3f}, of tokens {row['tokens']:.3f}, gap {row['gap']}; "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    write(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
