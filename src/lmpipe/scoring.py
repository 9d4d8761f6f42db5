"""Sampled responses scored by the reward model: what RL rewards and every report measures.

A scorer (`ScoreFn`) maps prompt and response token ids to normalised proxy scores. A response
that did not end with EOS gets the RL stage's missing-EOS penalty in place of a score when a
penalty is given (`score_generation`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lmpipe.sampling import Generation, generate

ScoreFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], np.ndarray]
"""(prompt token ids, response token ids incl. EOS) → normalised proxy scores."""


def score_generation(
    gen: Generation,
    prompts: Sequence[Sequence[int]],
    score_fn: ScoreFn,
    penalty: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, proxy): the reward model judges responses that ended with EOS; the others get
    the missing-EOS penalty (their proxy is NaN). With penalty None it judges every response."""
    ended = gen.ended.cpu().tolist()
    lengths = gen.lengths.cpu().tolist()
    rows = [i for i, e in enumerate(ended) if e or penalty is None]
    proxy = torch.full((len(ended),), float("nan"), dtype=torch.float64)
    if rows:
        resp = gen.response.cpu()
        got = score_fn([prompts[i] for i in rows], [resp[i, : lengths[i]].tolist() for i in rows])
        proxy[rows] = torch.as_tensor(np.asarray(got, dtype=np.float64))
    if penalty is None:
        return proxy.float(), proxy.float()
    scores = torch.where(gen.ended.cpu(), proxy, torch.full_like(proxy, penalty))
    return scores.float(), proxy.float()


@dataclass
class Samples:
    """Samples of one model on prompts repeated n times (prompt-major)."""

    prompt_index: list[int]
    responses: list[list[int]]  # token ids, EOS included when present
    ended: np.ndarray
    scores: np.ndarray  # the RL reward: proxy or missing-EOS penalty
    proxy: np.ndarray  # NaN where no EOS
    kl: np.ndarray  # Σ k1 per sequence against the reference
    kl_k3: np.ndarray
    entropy: np.ndarray = field(default_factory=lambda: np.zeros(0))  # mean per token
    logp: np.ndarray = field(default_factory=lambda: np.zeros(0))  # Σ log-prob of the sampler


MEASURES = ("kl", "k3", "ent", "logp")
"""What `sample_scored`'s `measure` gives per row: `Samples`' kl, kl_k3, entropy and logp."""


@torch.no_grad()
def sample_scored(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    n: int,
    score_fn: ScoreFn,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_id: int | Sequence[int],
    pad_id: int,
    penalty: float | None,
    generator: torch.Generator,
    batch_size: int = 256,
    measure: Callable[[Generation], Mapping[str, list[float]]] | None = None,
) -> Samples:
    """n samples of `model` per prompt, `batch_size` rows at a time, scored
    (`score_generation`). `measure(gen)` gives each batch's MEASURES per row, right after the
    batch is sampled; without it they are NaN."""
    index = [i for i in range(len(prompts)) for _ in range(n)]
    keys = ("resp", "ended", "scores", "proxy", *MEASURES)
    out: dict[str, list] = {k: [] for k in keys}
    was_training = model.training
    model.eval()
    for start in range(0, len(index), batch_size):
        rows = index[start : start + batch_size]
        batch = [prompts[i] for i in rows]
        gen: Generation = generate(
            model,
            batch,
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            pad_id=pad_id,
            temperature=temperature,
            generator=generator,
        )
        scores, proxy = score_generation(gen, batch, score_fn, penalty)
        lengths = gen.lengths.tolist()
        out["resp"] += [r[:n_].tolist() for r, n_ in zip(gen.response.cpu(), lengths, strict=True)]
        out["ended"] += gen.ended.cpu().tolist()
        out["scores"] += scores.tolist()
        out["proxy"] += proxy.tolist()
        if measure is None:
            measured = {key: [math.nan] * len(rows) for key in MEASURES}
        else:
            measured = measure(gen)
        for key in MEASURES:
            out[key] += measured[key]
    model.train(was_training)
    return Samples(
        index,
        out["resp"],
        np.array(out["ended"]),
        np.array(out["scores"]),
        np.array(out["proxy"]),
        np.array(out["kl"]),
        np.array(out["k3"]),
        np.array(out["ent"]),
        np.array(out["logp"]),
    )
