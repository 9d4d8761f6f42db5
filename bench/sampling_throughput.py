"""Sampling throughput: lmpipe's sampler (`lmpipe.sampling.generate`) against transformers'
`model.generate` on the same model, prompts and settings, alternated in one process.

    python bench/sampling_throughput.py
    python bench/sampling_throughput.py --batch 64 --new-tokens 32 --repeats 5
    python bench/sampling_throughput.py --model models/sft --k 12   # a trained model (below)

Pure ancestral sampling at temperature 1 (no top-k/top-p) from the default model shape (width
256, 4 layers, vocab 4096, random init, fp32), left-padded prompts of 12–24 tokens. A random model
rarely emits EOS, so both run every step: the figure is the per-step cost.

With `--model DIR` (a trained model folder and its data, after `dvc repro sft`) it measures the
reward stage's workload instead: `--k` samples for each of `--batch / k` RL prompts, which end at
EOS: lmpipe's sampler against itself without its two savings (one prefill per distinct prompt;
rows that ended leave the batch), and with bf16 weights (`preference.precision`). Tokens/s there
counts the tokens actually sampled.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from _results import add_json_arg, write
from lmpipe.config import ModelParams
from lmpipe.model import build_model
from lmpipe.sampling import generate, left_pad

SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|prompt|>": 3, "<|response|>": 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None, help="a trained model folder, e.g. models/sft")
    ap.add_argument("--data", default="data/prepared", help="with --model: its prepared data")
    ap.add_argument("--k", type=int, default=12, help="with --model: samples per prompt")
    add_json_arg(ap)
    args = ap.parse_args()
    if args.model:
        return trained(args)
    model = build_model(ModelParams(), 4096, SPECIAL, seed=0).eval()
    rng = np.random.default_rng(0)
    prompts = [
        [1, 3, *rng.integers(5, 4096, int(rng.integers(10, 23))).tolist(), 4]
        for _ in range(args.batch)
    ]
    ids, mask = left_pad(prompts, 0)

    def ours() -> None:
        generate(
            model,
            prompts,
            max_new_tokens=args.new_tokens,
            eos_id=2,
            pad_id=0,
            generator=torch.Generator().manual_seed(0),
        )

    @torch.no_grad()
    def hf() -> None:
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            eos_token_id=2,
            pad_token_id=0,
        )

    times: dict[str, list[float]] = {"lmpipe generate": [], "transformers generate": []}
    ours(), hf()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("lmpipe generate", ours), ("transformers generate", hf)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
        f"{args.new_tokens} new tokens"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"{name:22s} {args.batch * args.new_tokens / t:8,.0f} tokens/s  ({t:.2f} s)")
    ratio = med["transformers generate"] / med["lmpipe generate"]
    print(f"lmpipe / transformers: {ratio:.2f}x")
    rows = [
        {"sampler": k, "tokens_per_sec": args.batch * args.new_tokens / t} for k, t in med.items()
    ]
    write(
        args.json,
        {
            "batch": args.batch,
            "new_tokens": args.new_tokens,
            "rows": rows,
            "lmpipe_over_transformers": ratio,
        },
    )


def trained(args) -> None:
    import json
    from pathlib import Path

    from lmpipe.data.tokenizer import EOS, PAD, load_tokenizer, special_ids
    from lmpipe.model import load_model
    from lmpipe.sft import prompt_ids

    tok = load_tokenizer(args.data)
    ids = special_ids(tok)
    lines = (Path(args.data) / "prompts" / "rl.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["prompt"] for line in lines[: args.batch // args.k]]
    prompts = [prompt_ids(tok, t) for t in texts for _ in range(args.k)]
    fp32 = load_model(args.model)
    bf16 = load_model(args.model).to(torch.bfloat16)
    runs = {
        "without the savings": (fp32, {"share_prefix": False, "compact": False}),
        "lmpipe generate": (fp32, {}),
        "lmpipe generate, bf16": (bf16, {}),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, int] = {}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, (model, kw) in runs.items():
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(r)
            g = generate(
                model,
                prompts,
                max_new_tokens=args.new_tokens,
                eos_id=ids[EOS],
                pad_id=ids[PAD],
                generator=gen,
                **kw,
            )
            if r:
                times[name].append(time.perf_counter() - t0)
                tokens[name] = tokens.get(name, 0) + int(g.lengths.sum())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}: "
        f"{len(texts)} prompts x {args.k} samples, <= {args.new_tokens} new tokens"
    )
    base = statistics.median(times["without the savings"])
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        rate = tokens[name] / sum(t)
        print(f"{name:24s} {rate:8,.0f} tokens/s  ({med:.2f} s, {base / med:.2f}x)")
        rows.append({"sampler": name, "tokens_per_sec": rate, "speedup": base / med})
    write(
        args.json,
        {
            "model": args.model,
            "prompts": len(texts),
            "k": args.k,
            "new_tokens": args.new_tokens,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
