"""The fp16 ONNX model (meant for the CUDA provider) against fp32, on whatever provider is here.

Exports the model once with `fp16=True` into a temporary bundle, then times greedy generation of
`--new-tokens` tokens per row (EOS masked, median of `--repeats`) for fp32 and fp16 at batch 1
and 8 in this process, and prints each one's size and its parity with PyTorch.

    python bench/onnx_fp16.py [--model models/rl] [--bundle models/onnx/rl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from _results import add_json_arg, write
from lmpipe.model import load_model
from lmpipe.onnx.export import build_bundle, parity
from lmpipe.onnx.runtime import OnnxLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/rl")
    ap.add_argument("--bundle", default="models/onnx/rl", help="for its tokenizer and ids")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    add_json_arg(ap)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    src = Path(args.bundle)
    meta = json.loads((src / "bundle.json").read_text())
    model = load_model(args.model)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b"
        build_bundle(
            model,
            out,
            tokenizer_file=src / "tokenizer.json",
            special_tokens=meta["special_tokens"],
            generation={},
            source={"variant": "bench"},
            int8=False,
            fp16=True,
        )
        for precision in ("fp32", "fp16"):
            lm = OnnxLM(out, precision=precision)
            eos, forward = lm.special["eos"], lm.forward

            def no_eos(*a, forward=forward, eos=eos):
                logits, past = forward(*a)
                logits[..., eos] = -np.inf
                return logits, past

            lm.forward = no_eos
            prompt = lm.prompt_ids("Tom found a small shell on the beach and")
            size = (out / lm.meta["files"][precision]).stat().st_size / 1e6
            line = [f"{precision}  {size:6.2f} MB  {lm.session.get_providers()[0]}"]
            table.append(
                {"precision": precision, "mb": size, "provider": lm.session.get_providers()[0]}
            )
            for batch in (1, 8):
                rows = [prompt] * batch
                lm.generate_ids(rows, max_new_tokens=args.new_tokens, temperature=0)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    lm.generate_ids(rows, max_new_tokens=args.new_tokens, temperature=0)
                    times.append(time.perf_counter() - t0)
                tps = batch * args.new_tokens / statistics.median(times)
                line.append(f"b{batch} {tps:7,.0f} tokens/s")
                table[-1][f"b{batch}"] = tps
            lm.forward = forward
            prompts = [
                lm.prompt_ids(t)
                for t in (
                    "Tom found a shell.",
                    "Mia was sad because the rain came.",
                    "A baker named Olu",
                )
            ]
            row = parity(model, lm, prompts, 16, meta["special_tokens"]["pad"])
            line.append(
                f"max|dlogit| {row['max_abs_logit_diff']:.2e}  greedy match "
                f"{row['greedy_token_match']:.3f}"
            )
            print("  ".join(line))
            table[-1].update(
                {"max_dlogit": row["max_abs_logit_diff"], "greedy_match": row["greedy_token_match"]}
            )
    write(args.json, {"model": args.model, "new_tokens": args.new_tokens, "rows": table})


if __name__ == "__main__":
    main()
