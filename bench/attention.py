"""Attention kernel: `eager` (matmul, softmax, matmul) against torch's fused SDPA on this device,
for the work the pipeline does with it — sampling with the KV cache, and training steps with and
without a padding mask. Variants alternate in one process; medians of the repeats.

    python bench/attention.py
    python bench/attention.py --repeats 5 --precisions fp32

`lmpipe.model.attention_for` picks the kernel per device (eager on CPU, sdpa on CUDA) from these
figures; `LMPIPE_ATTENTION=sdpa` (or `eager`) overrides it for any stage.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _results import add_json_arg, write
from lmpipe.config import ModelParams
from lmpipe.model import build_model, set_attention
from lmpipe.precision import use_bf16
from lmpipe.sampling import generate

SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|prompt|>": 3, "<|response|>": 4}
KERNELS = ("sdpa", "eager")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two kernels")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_json_arg(ap)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(ModelParams(), 4096, SPECIAL, 0).to(device)  # the default shape
    prompts = [[1, 3, *range(10, 22 + i % 12), 4] for i in range(256)]
    precisions = [p for p in args.precisions if p == "fp32" or use_bf16("bf16", device)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(bf16: bool, rows: int, width: int, masked: bool) -> None:
        ids = torch.randint(5, 4096, (rows, width), device=device)
        mask = torch.ones_like(ids)
        if masked:  # every third row left-padded, as RL and SFT batches are
            mask[::3, : width // 8] = 0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=mask if masked else None).logits
        torch.log_softmax(logits.float(), -1)[..., 7].mean().backward()
        model.zero_grad(set_to_none=True)

    def sample(bf16: bool = False) -> None:  # the stages sample in fp32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            generate(model, prompts, max_new_tokens=48, eos_id=-1, pad_id=0)

    cases = {"sample b256 x 48 tokens": (sample, 256 * 48)}
    for p in precisions:
        bf16 = p == "bf16"
        cases[f"train 32x128 {p}"] = (lambda b=bf16: step(b, 32, 128, False), 32 * 128)
        cases[f"train 32x70 padded {p}"] = (lambda b=bf16: step(b, 32, 70, True), 32 * 70)

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for kernel in KERNELS:
            set_attention(model, kernel)
            for name, (fn, _) in cases.items():
                fn()  # warm-up
                for _ in range(args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    times.setdefault((name, kernel), []).append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")
    rows = []
    for name, (_, tokens) in cases.items():
        rate = {k: tokens / statistics.median(times[(name, k)]) for k in KERNELS}
        print(
            f"{name:26s} sdpa {rate['sdpa']:8,.0f} tokens/s  eager {rate['eager']:8,.0f}"
            f" tokens/s  eager/sdpa {rate['eager'] / rate['sdpa']:.2f}x"
        )
        rows.append(
            {
                "case": name,
                "sdpa": rate["sdpa"],
                "eager": rate["eager"],
                "eager_over_sdpa": rate["eager"] / rate["sdpa"],
            }
        )
    write(args.json, {"device": str(device), "rows": rows})


if __name__ == "__main__":
    main()
