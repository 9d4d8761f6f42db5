"""Losses over the vocabulary: lmpipe's chunked cross-entropy and distillation KL
(`lmpipe.losses`) against the same losses written with autograd (an fp32 copy of the logits, log
softmax, torch's cross-entropy), alone and inside a whole training step of the default shapes.
Variants alternate in one process; medians of the repeats.

    python bench/losses.py
    python bench/losses.py --repeats 10 --precision fp32

The pretraining step is the default model on 32 windows of 128 tokens. The distillation step is
the compress stage's: a 2-layer student of the default 4-layer teacher, 16 corpus windows of 128
tokens (every position a target) and 16 teacher-sample rows of 90 tokens (targets on the last
50), one backward each, then AdamW. Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _results import add_json_arg, write
from lmpipe.batches import IGNORE, Batch
from lmpipe.compress.distill import build_student, kd_loss_sum
from lmpipe.config import CompressParams, ModelParams
from lmpipe.losses import cross_entropy_sum
from lmpipe.model import build_model
from lmpipe.precision import use_bf16

SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2}
VOCAB = 4096


def autograd_ce(logits, labels):
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")


def autograd_kd(s, t, labels):
    """KL(p_t ‖ p_s) as torch's soft-target cross-entropy minus p_t's entropy (T = 1)."""
    sel = labels != IGNORE
    s = s[sel].float()
    with torch.no_grad():
        log_pt = F.log_softmax(t[sel].float(), -1)
        p_t = log_pt.exp()
        neg_entropy = (p_t * log_pt).sum()
    return F.cross_entropy(s, p_t, reduction="sum") + neg_entropy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--precision", default="auto", help="auto (bf16 where it pays), bf16, fp32")
    add_json_arg(ap)
    args = ap.parse_args()
    bf16 = use_bf16(args.precision, torch.device("cpu"))
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    teacher = build_model(ModelParams(), VOCAB, SPECIAL, 0)
    student = build_student(teacher, CompressParams(student_init="random"), None, 0)
    models = {"teacher": teacher, "student": student}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    windows = torch.randint(5, VOCAB, (32, 129), generator=gen)
    samples = torch.randint(5, VOCAB, (16, 90), generator=gen)
    sample_labels = samples.clone()
    sample_labels[:, :40] = IGNORE
    distill_batches = [
        Batch(windows[:16, :-1], windows[:16, 1:]),
        Batch(samples, sample_labels),
    ]
    logits = torch.randn(16 * 128, VOCAB, generator=gen).to(dtype)
    teacher_logits = torch.randn(16 * 128, VOCAB, generator=gen).to(dtype)
    labels = windows[:16, 1:].flatten()

    def loss_only(loss: Callable) -> Callable[[], None]:
        def run() -> None:
            loss(logits.clone().requires_grad_(True)).backward()

        return run

    def pretrain_step(ce: Callable) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = teacher(input_ids=windows[:, :-1], use_cache=False).logits
                loss = ce(out.flatten(0, 1), windows[:, 1:].flatten())
            loss.backward()
            opts["teacher"].step()
            opts["teacher"].zero_grad(set_to_none=True)

        return run

    def distill_step(kd: Callable) -> Callable[[], None]:  # as DistillLoss and the loop run it
        def run() -> None:
            for b in distill_batches:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    with torch.no_grad():
                        t = teacher(input_ids=b.input_ids, use_cache=False).logits
                    s = student(input_ids=b.input_ids, use_cache=False).logits
                    loss = kd(s, t, b.labels)
                loss.backward()
            opts["student"].step()
            opts["student"].zero_grad(set_to_none=True)

        return run

    cases = {
        "cross-entropy, 2048 positions": (
            loss_only(lambda x: autograd_ce(x, labels)),
            loss_only(lambda x: cross_entropy_sum(x, labels)),
        ),
        "pretraining step": (pretrain_step(autograd_ce), pretrain_step(cross_entropy_sum)),
        "distillation KL, 2048 positions": (
            loss_only(lambda x: autograd_kd(x, teacher_logits, labels)),
            loss_only(lambda x: kd_loss_sum(x, teacher_logits, labels)),
        ),
        "distillation step": (distill_step(autograd_kd), distill_step(kd_loss_sum)),
    }
    precision = "bf16" if bf16 else "fp32"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {precision}")
    rows = []
    for name, (baseline, ours) in cases.items():
        times: dict[str, list[float]] = {"autograd": [], "lmpipe": []}
        baseline(), ours()  # warm-up
        for _ in range(args.repeats):
            for variant, fn in (("autograd", baseline), ("lmpipe", ours)):
                t0 = time.perf_counter()
                fn()
                times[variant].append(time.perf_counter() - t0)
        a, o = (1000 * statistics.median(times[v]) for v in ("autograd", "lmpipe"))
        print(f"{name:32s} autograd {a:7.1f} ms  lmpipe {o:7.1f} ms  {a / o:.2f}x")
        rows.append({"case": name, "autograd_ms": a, "lmpipe_ms": o, "speedup": a / o})
    write(args.json, {"precision": precision, "rows": rows})


if __name__ == "__main__":
    main()
