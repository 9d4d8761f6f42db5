"""Sampling throughput: lmpipe's sampler (`lmpipe.sampling.generate`) against transformers'
`model.generate` on the same model, prompts and settings, alternated in one process.

    python bench/sampling_throughput.py
    python bench/sampling_throughput.py --batch 64 --new-tokens 32 --repeats 5

Pure ancestral sampling at temperature 1 (no top-k/top-p) from the default model shape (width
256, 4 layers, vocab 4096, random init, fp32), left-padded prompts of 12–24 tokens. A random model
rarely emits EOS, so both run every step: the figure is the per-step cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from lmpipe.config import ModelParams
from lmpipe.model import build_model
from lmpipe.sampling import generate, left_pad

SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|prompt|>": 3, "<|response|>": 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = build_model(ModelParams(), 4096, SPECIAL, seed=0).eval()
    rng = np.random.default_rng(0)
    prompts = [
        [1, 3, *rng.integers(5, 4096, int(rng.integers(10, 23))).tolist(), 4]
        for _ in range(args.batch)
    ]
    ids, mask = left_pad(prompts, 0)

    def ours() -> None:
        generate(model, prompts, max_new_tokens=args.new_tokens, eos_id=2, pad_id=0,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip

    @torch.no_grad()
    def hf() -> None:
        model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
            temperature=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            eos_token_id=2, pad_token_id=0,
        )  # fmt: skip

    times: dict[str, list[float]] = {"lmpipe generate": [], "transformers generate": []}
    ours(), hf()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("lmpipe generate", ours), ("transformers generate", hf)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"{args.new_tokens} new tokens")  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"{name:22s} {args.batch * args.new_tokens / t:8,.0f} tokens/s  ({t:.2f} s)")
    print(f"lmpipe / transformers: {med['transformers generate'] / med['lmpipe generate']:.2f}x")


if __name__ == "__main__":
    main()
