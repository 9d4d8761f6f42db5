"""The measurements every compressed variant is reported with, next to the teacher's own."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.batches import IGNORE, Batch
from lmpipe.data.stats import distinct_ngram_ratio
from lmpipe.sampling import generate
from lmpipe.scoring import ScoreFn, sample_scored


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def val_metrics(
    model: torch.nn.Module, teacher: torch.nn.Module, batches: Sequence[Batch]
) -> dict[str, float]:
    """Per target token on fixed val batches: cross-entropy (→ perplexity) and
    KL(teacher ‖ model) in nats."""
    return val_metrics_many({"model": model}, teacher, batches)["model"]


@torch.no_grad()
def val_metrics_many(
    models: Mapping[str, torch.nn.Module], teacher: torch.nn.Module, batches: Sequence[Batch]
) -> dict[str, dict[str, float]]:
    """`val_metrics` of several models in one pass over the batches: the teacher runs once a
    batch, not once a model."""
    tdev = device_of(teacher)
    sums = {name: [0.0, 0.0] for name in models}
    for m in models.values():
        m.eval()
    n = 0
    for b in batches:
        sel = b.labels != IGNORE
        t = teacher(input_ids=b.input_ids.to(tdev), use_cache=False).logits.float()
        logq = F.log_softmax(t[sel.to(tdev)], -1)
        labels = b.labels[sel]
        for name, model in models.items():
            dev = device_of(model)
            if model is teacher:
                logp = logq
            else:
                out = model(input_ids=b.input_ids.to(dev), use_cache=False).logits.float()
                logp = F.log_softmax(out[sel.to(dev)], -1)
            q = logq.to(dev)
            sums[name][0] += float(F.nll_loss(logp, labels.to(dev), reduction="sum"))
            sums[name][1] += float(F.kl_div(logp, q, log_target=True, reduction="sum"))
        n += int(sel.sum())
    out = {}
    for name, (ce, kl) in sums.items():
        loss = ce / max(n, 1)
        out[name] = {"val_loss": loss, "val_ppl": math.exp(loss), "kl_to_teacher": kl / max(n, 1)}
    return out


@torch.no_grad()
def tokens_per_sec(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    new_tokens: int,
    pad_id: int,
    repeats: int = 3,
) -> float:
    """Sampled tokens per second with the KV cache: `batch_size` rows × `new_tokens` each (EOS
    ignored, so every model generates the same number), median of `repeats` after a warm-up."""
    rows = [prompts[i % len(prompts)] for i in range(batch_size)]
    gen = torch.Generator(device=device_of(model)).manual_seed(0)
    times = []
    for r in range(repeats + 1):
        if device_of(model).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, rows, max_new_tokens=new_tokens, eos_id=-1, pad_id=pad_id, generator=gen)
        if device_of(model).type == "cuda":
            torch.cuda.synchronize()
        if r:  # the first call warms up kernels and caches
            times.append(time.perf_counter() - t0)
    return batch_size * new_tokens / statistics.median(times)


def sample_scores(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    prompt_texts: Sequence[str],
    n: int,
    score_fn: ScoreFn,
    gold_fn: Callable[[list[str], list[str]], Sequence[float]],
    decode: Callable[[list[int]], str],
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    pad_id: int,
    seed: int,
) -> tuple[dict[str, float], list[str]]:
    """n samples per eval prompt (T = 1): mean gold score (with its standard error), mean
    normalised reward-model score (responses that ended with EOS), EOS rate and distinct-2;
    plus the texts."""
    gen = torch.Generator(device=device_of(model)).manual_seed(seed)
    s = sample_scored(
        model, prompts, n, score_fn, max_new_tokens=max_new_tokens, temperature=1.0,
        eos_id=eos_id, pad_id=pad_id, penalty=None, generator=gen,
    )  # fmt: skip
    texts = [decode(r) for r in s.responses]
    gold = gold_fn([prompt_texts[i] for i in s.prompt_index], texts)
    proxy = s.proxy[s.ended] if s.ended.any() else np.array([float("nan")])
    return {
        "gold_reward": float(np.mean(gold)),
        "gold_reward_se": float(np.std(gold, ddof=1) / np.sqrt(len(gold))) if len(gold) > 1 else 0,
        "proxy_reward": float(np.mean(proxy)),
        "eos_rate": float(np.mean(s.ended)),
        "distinct_2": distinct_ngram_ratio(texts, 2),
    }, texts
