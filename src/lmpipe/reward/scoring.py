"""Scoring token sequences with a reward model: the head's pooling (`last`, or `mean` or `sum`
over the answer), prompts run once for the rows that share them, and batched scoring of many
sequences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmpipe.sampling import dedupe, left_pad, run_shared_prompts


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    width = max(map(len, seqs))
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _lengths(input_ids: torch.Tensor, lengths: torch.Tensor | None, pad_id: int | None):
    """Each row's length: given, or (older callers) the count of non-PAD tokens."""
    if lengths is not None:
        return lengths.to(input_ids.device)
    return (input_ids != pad_id).sum(-1)


def response_start(input_ids: torch.Tensor, marker: int, last: bool) -> torch.Tensor:
    """(B,) index of each row's first answer token: after the first (or `last`) occurrence of
    the marker token; -1 where the row has none."""
    hit = input_ids == marker
    t = torch.arange(input_ids.shape[1], device=input_ids.device)
    if last:
        pos = torch.where(hit, t, -1).max(-1).values
    else:
        pos = torch.where(hit, t, input_ids.shape[1]).min(-1).values
        pos = torch.where(hit.any(-1), pos, -1)
    return torch.where(pos >= 0, pos + 1, -1)


def sequence_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    share_prompts: bool = True,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) fp32 raw scores of right-padded sequences in the template; `lengths` (B,) says
    where each row's padding starts (default: where its PAD tokens are, for PAD ≠ EOS).

    `last`: the head at the last real token (transformers' own sequence classification).
    `mean`: the head at every answer position (after the template's answer marker, e.g.
    RESPONSE, up to and including the end-of-turn token), averaged; `sum`: the same positions
    summed. A sequence without the marker pools over all its tokens.
    On the default task (sentiment of the response) `mean` ranks pairs much better than `last`
    (README, section "reward"); a causal model reading one position has to learn to gather
    the evidence first.

    With `share_prompts`, rows that share a prompt (the k samples of one prompt, a preference
    pair) run that prompt through the model once and reuse its keys and values for each of
    their responses (`shared_prompt_layout`): the same scores and gradients, fewer tokens.
    """
    config = model.config
    n = _lengths(input_ids, lengths, config.pad_token_id)
    layout = None
    rid = getattr(config, "lmpipe_response_token_id", None)
    last_marker = getattr(config, "lmpipe_response_marker_last", False)
    if share_prompts and rid is not None and config.pad_token_id is not None:
        layout = shared_prompt_layout(input_ids, rid, config.pad_token_id, n, last_marker)
    if layout is not None:
        return _shared_prompt_scores(model, layout)
    t = torch.arange(input_ids.shape[1], device=input_ids.device)
    real = t < n[:, None]
    pooling = pooling_of(config)
    if pooling == "last":
        if lengths is None:
            return model(input_ids=input_ids).logits[:, 0].float()
        hidden = model.base_model(input_ids=input_ids).last_hidden_state
        return model.score(hidden[torch.arange(len(n), device=n.device), n - 1]).squeeze(-1).float()
    hidden = model.base_model(input_ids=input_ids).last_hidden_state  # causal: pads come last
    per_token = model.score(hidden).squeeze(-1).float()  # (B, T)
    if rid is None:
        keep = real
    else:
        cut = response_start(input_ids, rid, last_marker)
        after = t >= cut[:, None]
        if not last_marker:  # a RESPONSE token inside a response is not a response position
            after &= input_ids != rid
        keep = torch.where((cut >= 0)[:, None], after, torch.ones_like(after)) & real
    return _pool(per_token, keep.float(), pooling)


@dataclass
class PromptLayout:
    """Right-padded sequences split where their answer starts: the distinct prompts,
    left-padded, and every row's response, right-padded, with the prompt row it continues."""

    prompt_ids: torch.Tensor  # (G, P)
    prompt_mask: torch.Tensor  # (G, P)
    response_ids: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R)
    owner: torch.Tensor  # (B,) row of prompt_ids
    response_id: int | None = None  # a marker that may recur inside answers (plain template)

    @property
    def n_tokens(self) -> int:
        return self.prompt_ids.numel() + self.response_ids.numel()


def shared_prompt_layout(
    input_ids: torch.Tensor,
    response_id: int,
    pad_id: int,
    lengths: torch.Tensor | None = None,
    last: bool = False,
) -> PromptLayout | None:
    """The layout of `_shared_prompt_scores`, or None where sharing does not apply: a row
    without the answer marker or without a token after it, or no prompt that repeats."""
    if input_ids.shape[0] < 2:
        return None
    cut = response_start(input_ids, response_id, last)  # prompt length, marker included
    if bool((cut < 0).any()):
        return None
    length = _lengths(input_ids, lengths, pad_id)  # right padding only
    if bool((length <= cut).any()):
        return None
    prompts, owner = dedupe(
        [row[:c] for row, c in zip(input_ids.tolist(), cut.tolist(), strict=True)]
    )
    if len(prompts) == len(owner):
        return None
    device = input_ids.device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    n = length - cut
    width = int(n.max())
    offsets = torch.arange(width, device=device)
    response_mask = offsets < n[:, None]
    gathered = input_ids.gather(1, (cut[:, None] + offsets).clamp(max=input_ids.shape[1] - 1))
    response_ids = torch.where(response_mask, gathered, torch.full_like(gathered, pad_id))
    return PromptLayout(
        prompt_ids,
        prompt_mask,
        response_ids,
        response_mask.long(),
        torch.tensor(owner, device=device),
        None if last else response_id,
    )


def _shared_prompt_scores(model: torch.nn.Module, layout: PromptLayout) -> torch.Tensor:
    """`sequence_scores` with each distinct prompt run once (`run_shared_prompts`): equal to
    the plain pass up to float rounding (tests check scores and gradients)."""
    owner, r_mask = layout.owner, layout.response_mask
    _, hidden = run_shared_prompts(
        model.base_model, layout.prompt_ids, layout.prompt_mask, owner, layout.response_ids, r_mask
    )
    per_token = model.score(hidden).squeeze(-1).float()  # (B, R)
    pooling = pooling_of(model.config)
    if pooling == "last":
        return per_token[torch.arange(len(owner), device=owner.device), r_mask.sum(-1) - 1]
    weight = r_mask.bool()
    if layout.response_id is not None:  # as the plain pass: a marker inside an answer
        weight = weight & (layout.response_ids != layout.response_id)
    return _pool(per_token, weight.float(), pooling)


def pooling_of(config) -> str:
    """The reward model's pooling; a model without lmpipe's attribute is a plain transformers
    sequence classifier, which reads the last token."""
    return getattr(config, "lmpipe_reward_pooling", "last")


def _pool(per_token: torch.Tensor, weight: torch.Tensor, pooling: str) -> torch.Tensor:
    """The response positions' scores, summed (`sum`) or averaged (`mean`)."""
    total = (per_token * weight).sum(-1)
    if pooling == "sum":
        return total
    return total / weight.sum(-1).clamp(min=1.0)


@torch.no_grad()
def raw_scores(
    model: torch.nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 128
) -> np.ndarray:
    """Unnormalised scores of full sequences (prompt template + response + EOS), in input order.

    Each distinct sequence is scored once (held-out pairs repeat every response in k − 1
    pairs), in batches of similar lengths so that little of a batch is padding; where the
    model knows its RESPONSE token, the sequences of one prompt go into one batch together so
    that the prompt is run once (`sequence_scores`)."""
    device = next(model.parameters()).device
    distinct, slots = dedupe(seqs)
    rid = getattr(model.config, "lmpipe_response_token_id", None)
    last = getattr(model.config, "lmpipe_response_marker_last", False)

    def key(i: int) -> tuple:
        s = distinct[i]
        cut = 0
        if rid is not None and rid in s:
            cut = (len(s) - s[::-1].index(rid)) if last else s.index(rid) + 1
        return (cut, tuple(s[:cut]), len(s))

    order = sorted(range(len(distinct)), key=key)
    scores = torch.zeros(len(distinct), dtype=torch.float64, device="cpu")  # for numpy
    was_training = model.training
    model.eval()
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        ids = right_pad([distinct[j] for j in rows], pad_id).to(device)
        lengths = torch.tensor([len(distinct[j]) for j in rows], device=device)
        scores[rows] = sequence_scores(model, ids, lengths=lengths).cpu().double()
    model.train(was_training)
    return scores[slots].numpy()
