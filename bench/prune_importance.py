"""Which importance score prunes better? Taylor vs weight magnitude vs random, before recovery.

Prunes the RL policy (or any lmpipe model) at several MLP and head fractions with each score and
prints val perplexity and per-token KL to the unpruned model on the same fixed val windows the
compress stage uses. No training: this isolates the choice of which units to remove.

    python bench/prune_importance.py [--model models/rl] [--data data/prepared]
"""

from __future__ import annotations

import argparse
import time

import torch

from _results import add_json_arg, write
from lmpipe.batches import TokenWindows, split_parts
from lmpipe.chat import load_template
from lmpipe.compress.distill import MixedBatches, teacher_examples
from lmpipe.compress.prune import Importance, magnitude_importance, prune, taylor_importance
from lmpipe.compress.score import val_metrics
from lmpipe.data.tokenizer import EOS, PAD, load_tokenizer, read_tokens, special_ids
from lmpipe.io import read_json, read_jsonl
from lmpipe.model import context_length, load_model
from lmpipe.train import lm_loss_sum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/rl")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    add_json_arg(ap)
    args = ap.parse_args()
    tok = load_tokenizer(args.data)
    ids = special_ids(tok)
    meta = read_json(f"{args.data}/meta.json")
    model = load_model(args.model).requires_grad_(False)
    ctx = context_length(model)
    val = TokenWindows(
        read_tokens(f"{args.data}/val.bin", meta["dtype"]), ctx, args.batch_size, 0
    ).fixed_batches(8)
    rows = read_jsonl(f"{args.data}/prompts/rl.jsonl")
    _, prompts = load_template(args.data).fitting_prompts([r["prompt"] for r in rows], ctx, 48, 256)
    examples = teacher_examples(
        model,
        prompts,
        max_new_tokens=48,
        eos_id=ids[EOS],
        pad_id=ids[PAD],
        temperature=1.0,
        seed=0,
    )
    src = MixedBatches(
        read_tokens(f"{args.data}/train.bin", meta["dtype"]),
        ctx,
        examples,
        args.batch_size,
        0.5,
        7,
        ids[PAD],
    )
    calib = [b for _ in range(args.calibration_batches) for b in split_parts(src.next_batch())]
    t0 = time.perf_counter()
    scores = {"taylor": taylor_importance(model, calib, lm_loss_sum)}
    t_taylor = time.perf_counter() - t0
    scores["magnitude"] = magnitude_importance(model)
    g = torch.Generator().manual_seed(0)
    rand = magnitude_importance(model)
    scores["random"] = Importance(
        torch.rand(rand.neurons.shape, generator=g),
        torch.rand(rand.heads.shape, generator=g) if rand.heads is not None else None,
    )
    base = val_metrics(model, model, val)
    print(f"{args.model}: val ppl {base['val_ppl']:.2f}; Taylor scores took {t_taylor:.1f} s")
    print(f"{'mlp':>5} {'heads':>5}  " + "  ".join(f"{k:>22}" for k in scores))
    rows = []
    for mlp, heads in [(0.3, 0.0), (0.5, 0.0), (0.3, 0.25), (0.0, 0.5)]:
        if heads and rand.heads is None:
            continue
        cells = []
        rows.append({"mlp": mlp, "heads": heads})
        for name, imp in scores.items():
            m = val_metrics(prune(model, imp, mlp, heads), model, val)
            cells.append(f"ppl {m['val_ppl']:7.2f} KL {m['kl_to_teacher']:6.3f}")
            rows[-1].update({f"{name}_ppl": m["val_ppl"], f"{name}_kl": m["kl_to_teacher"]})
        print(f"{mlp:5.2f} {heads:5.2f}  " + "  ".join(f"{c:>22}" for c in cells))
    write(args.json, {"model": args.model, "base_ppl": base["val_ppl"], "rows": rows})


if __name__ == "__main__":
    main()
