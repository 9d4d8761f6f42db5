"""Generation speed: PyTorch eager with the KV cache vs the exported ONNX bundle (fp32, int8).

One process, the same prompts, greedy decoding of exactly `--new-tokens` tokens per row (EOS is
never chosen: its logit is masked in every engine, so all of them do the same work). Prints
tokens/s and ms per generated token (per row) for batch 1 and 8, and each engine's speed relative
to transformers' `model.generate`.

    python bench/onnx_generation.py [--bundle models/onnx/rl] [--model models/rl]
    python bench/onnx_generation.py --keep-freed-memory   # as the training stages' allocator
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from _results import add_json_arg, write
from lmpipe.allocator import keep_freed_memory
from lmpipe.model import load_model
from lmpipe.onnx.runtime import OnnxLM
from lmpipe.sampling import generate


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="models/onnx/rl")
    ap.add_argument("--model", default="models/rl")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed blocks, as the training stages run (lmpipe.allocator); "
        "export and evaluate do not",
    )
    add_json_arg(ap)
    args = ap.parse_args()
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory: this C library has no mallopt (glibc only)")
    warnings.filterwarnings("ignore")
    model = load_model(args.model)
    fp32, int8 = OnnxLM(args.bundle), OnnxLM(args.bundle, precision="int8")
    eos, pad = fp32.special["eos"], fp32.special["pad"]
    prompt = fp32.prompt_ids("Tom found a small shell on the beach and")
    n = args.new_tokens
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {args.bundle}, "
        f"{n} new tokens, greedy, median of {args.repeats}"
        f"{', freed host memory kept' if args.keep_freed_memory else ''}"
    )

    class NoEos(torch.nn.Module):  # every engine masks EOS so every row makes n tokens
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def forward(self, *a, **k):
            out = self.m(*a, **k)
            out.logits[..., eos] = -1e9
            return out

    table = []
    for batch in (1, 8):
        rows = [prompt] * batch
        ids = torch.tensor(rows)
        results = {}

        def hf(ids=ids):
            from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

            with torch.no_grad():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=pad,
                    logits_processor=LogitsProcessorList([SuppressTokensLogitsProcessor([eos])]),
                )

        results["transformers generate (eager, KV cache)"] = timed(hf, args.repeats)
        wrapped = NoEos(model)

        def ours(rows=rows, wrapped=wrapped):
            generate(wrapped, rows, max_new_tokens=n, eos_id=-1, pad_id=pad, greedy=True)

        results["lmpipe sampler (eager, static KV cache)"] = timed(ours, args.repeats)
        for name, lm in (("onnx fp32", fp32), ("onnx int8", int8)):
            orig = lm.forward

            def forward(*a, orig=orig):
                logits, past = orig(*a)
                logits[..., eos] = -np.inf
                return logits, past

            lm.forward = forward
            results[name] = timed(
                lambda lm=lm, rows=rows: lm.generate_ids(rows, max_new_tokens=n, temperature=0),
                args.repeats,
            )
            lm.forward = orig
        base = results["transformers generate (eager, KV cache)"]
        print(f"batch {batch}")
        for name, sec in results.items():
            print(
                f"  {name:42s} {batch * n / sec:8,.0f} tokens/s  {1000 * sec / n:6.2f} ms/token"
                f"  {base / sec:5.2f}x"
            )
            table.append(
                {
                    "batch": batch,
                    "engine": name,
                    "tokens_per_sec": batch * n / sec,
                    "ms_per_token": 1000 * sec / n,
                    "vs_transformers": base / sec,
                }
            )
    write(args.json, {"bundle": args.bundle, "new_tokens": n, "rows": table})


if __name__ == "__main__":
    main()
