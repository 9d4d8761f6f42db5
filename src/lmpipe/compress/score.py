"""Val perplexity and KL to the teacher on fixed batches: what pruning and distillation cost."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from lmpipe.batches import IGNORE, Batch


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
