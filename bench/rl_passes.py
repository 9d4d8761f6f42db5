"""Two parts of the RL step against what they replaced, alternated in one process (medians):

- log-probs (and entropies) of the sampled tokens from the output head: autograd through a full
  log-softmax over (positions x vocabulary) against `lmpipe.logprobs.head_logprobs`, which
  makes and drops the logits a chunk at a time; with grad (forward + backward, entropies too, as
  the RLOO/DPG update; its backward pass either keeps the probabilities, as on a CPU where they
  fit in `HEAD_KEEP_PROBS_BYTES`, or remakes the logits, as on accelerators) and without (the
  reference pass);
- the training rollout's sampler in fp32 against under bf16 autocast (what `rl.precision`
  resolving to bf16 now runs), where this device has a bf16 matmul.

    python bench/rl_passes.py
    python bench/rl_passes.py --positions 8192 --vocab 32000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

import lmpipe.logprobs as logprobs
from _results import add_json_arg, write
from lmpipe.config import ModelParams
from lmpipe.logprobs import head_logprobs
from lmpipe.model import build_model
from lmpipe.precision import use_bf16
from lmpipe.sampling import generate

SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|prompt|>": 3, "<|response|>": 4}


def full_softmax(hidden, head, tokens, with_entropy=True):
    """What the passes did before `head_logprobs`: the whole log-softmax, then a gather."""
    logp = torch.log_softmax(head(hidden).float(), dim=-1)
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, tokens[:, None]).squeeze(-1), ent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=4096, help="response positions (128 x 32)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    add_json_arg(ap)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args.width, args.vocab, bias=False).to(device)
    hidden = torch.randn(args.positions, args.width, generator=g).to(device).requires_grad_()
    tokens = torch.randint(0, args.vocab, (args.positions,), generator=g).to(device)
    upstream = torch.randn(args.positions, generator=g).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def with_grad(fn):
        logp, _ = fn(hidden, head, tokens, True)
        (logp * upstream).sum().backward()

    def no_grad(fn):
        with torch.no_grad():
            fn(hidden, head, tokens, False)

    def chunked(h, w, t, e):
        return head_logprobs(h, w, t, 1.0, e)

    def remade(h, w, t, e):  # the backward pass remakes the logits, whatever the device
        keep, logprobs.HEAD_KEEP_PROBS_BYTES = logprobs.HEAD_KEEP_PROBS_BYTES, 0
        try:
            return head_logprobs(h, w, t, 1.0, e)
        finally:
            logprobs.HEAD_KEEP_PROBS_BYTES = keep

    grad, plain = "log-probs + entropies, forward + backward", "log-probs, no grad"
    cases = {
        (grad, "full log-softmax"): partial(with_grad, full_softmax),
        (grad, "head_logprobs, remade"): partial(with_grad, remade),
        (grad, "head_logprobs"): partial(with_grad, chunked),
        (plain, "full log-softmax"): partial(no_grad, full_softmax),
        (plain, "head_logprobs"): partial(no_grad, chunked),
    }
    if use_bf16("bf16", device):
        model = build_model(ModelParams(d_model=256, n_layers=4, n_heads=4), 4096, SPECIAL, 0)
        model = model.to(device)
        # 64 prompts of 16 tokens x 2 samples, 32 tokens each (no EOS): bench/rl_throughput.py
        prompts = [[1, 3, *(5 + (97 * i + j) % 4000 for j in range(13)), 4] for i in range(64)]
        prompts = [p for p in prompts for _ in range(2)]

        def sample(bf16: bool) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                generate(model, prompts, max_new_tokens=32, eos_id=-1, pad_id=0)

        cases[("sampling 128 x 32 tokens", "fp32")] = partial(sample, False)
        cases[("sampling 128 x 32 tokens", "bf16 autocast")] = partial(sample, True)
    times: dict[tuple[str, str], list[float]] = {}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for key, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.setdefault(key, []).append(time.perf_counter() - t0)
            hidden.grad = head.weight.grad = None
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; "
        f"{args.positions} positions, vocabulary {args.vocab}, width {args.width}"
    )
    base: dict[str, float] = {}
    rows = []
    for (part, variant), ts in times.items():
        ms = 1e3 * statistics.median(ts)
        base.setdefault(part, ms)
        print(f"{part:42s} {variant:21s} {ms:8.1f} ms  x{base[part] / ms:.2f}")
        rows.append({"part": part, "variant": variant, "ms": ms, "speedup": base[part] / ms})
    write(
        args.json,
        {
            "device": str(device),
            "positions": args.positions,
            "vocab": args.vocab,
            "width": args.width,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
