"""Batched ancestral sampling with the KV cache — the one sampler of reward, RL and evaluation.

A small loop over `model(..., cache=...)` rather than `model.generate`: for the
models this pipeline trains on a CPU, generate's per-step machinery costs more than the model
(measured in `bench/sampling_throughput.py`). Pure ancestral sampling from the temperature-scaled
distribution, no top-k/top-p (they bias the KL that RL estimates); greedy decoding on request.

Prompts are left-padded with an attention mask and explicit position ids, so a padded row gives
the same tokens as the same prompt alone; the masks, not the PAD id, say what is padding (PAD may
equal EOS). A row ends at its first stop token (EOS, or any of the chat template's stop ids);
after it the row is filled with PAD; the loop stops when every row has ended or
`max_new_tokens` is reached.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache as memoize
from typing import Any

import torch
from transformers import DynamicCache, StaticCache

from lmpipe.chat import ChatTemplate
from lmpipe.dist import gather_shards, shard
from lmpipe.progress import Progress
from lmpipe.streams import stream_keys, stream_uniforms


@dataclass
class Generation:
    """A sampled batch. `sequences` = left-padded prompts then responses."""

    sequences: torch.Tensor  # (B, W + R) int64
    attention_mask: torch.Tensor  # (B, W + R) int64, 0 on left padding and after the response
    prompt_width: int  # W
    response: torch.Tensor  # (B, R): response tokens incl. EOS, PAD after it
    response_mask: torch.Tensor  # (B, R) bool: real response tokens (EOS included)
    ended: torch.Tensor  # (B,) bool: emitted EOS within the limit

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


def pack(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    ended: Sequence[bool],
    pad_id: int,
    device: torch.device | str = "cpu",
) -> Generation:
    """A `Generation` of given prompts and responses (a response that ended holds its stop
    token), laid out as `generate` lays out its own: to rescore samples with another model."""
    p_ids, p_mask = left_pad(prompts, pad_id)
    resp = torch.full((len(responses), max(1, *map(len, responses))), pad_id, dtype=torch.long)
    r_mask = torch.zeros(resp.shape, dtype=torch.bool)
    for i, r in enumerate(responses):
        resp[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        r_mask[i, : len(r)] = True
    return Generation(
        torch.cat([p_ids, resp], 1).to(device),
        torch.cat([p_mask, r_mask.long()], 1).to(device),
        p_ids.shape[1],
        resp.to(device),
        r_mask.to(device),
        torch.as_tensor(list(ended), dtype=torch.bool, device=device),
    )


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@memoize
def cache_kwarg(model_class: type) -> str:
    """The forward argument that takes the KV cache: `cache` from transformers 5.2x on,
    `past_key_values` before (still accepted there, with a FutureWarning every call)."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def sample_categorical(
    logits: torch.Tensor, generator: torch.Generator | None, u: torch.Tensor | None = None
) -> torch.Tensor:
    """One draw per row by inverting the CDF: one uniform per row (multinomial draws one
    exponential per vocabulary entry, which dominated the sampling time on CPU), `u` (B,) if
    given, else from `generator`."""
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(-1)
    if u is None:
        u = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    idx = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)
    return idx.squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def dedupe(seqs: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """(distinct sequences in first-seen order, index of each sequence among them)."""
    first: dict[tuple[int, ...], int] = {}
    inverse = [first.setdefault(tuple(s), len(first)) for s in seqs]
    return [list(s) for s in first], inverse


def run_shared_prompts(
    backbone: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    owner: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each distinct prompt (left-padded rows) through `backbone` (a transformer without its
    head) once, then every row's response tokens on its prompt's keys and values, copied per
    row (`owner`: the prompt row of each row); gradients flow back through the copy. Returns
    the prompt's last hidden state per row (B, d) and the response tokens' (B, R, d). Causal
    attention makes a prompt's states independent of what follows, so both equal one pass over
    the full rows up to float rounding (the reward model and the RL passes test it)."""
    cache = DynamicCache(config=backbone.config)
    kv = {cache_kwarg(type(backbone)): cache}
    out = backbone(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions(prompt_mask),
        use_cache=True,
        **kv,
    )
    last = out.last_hidden_state[:, -1][owner]
    if response_ids.shape[1] == 0:
        return last, last.new_zeros(len(last), 0, last.shape[-1])
    cache.reorder_cache(owner)
    mask = torch.cat([prompt_mask[owner], response_mask], dim=1)
    hidden = backbone(
        input_ids=response_ids,
        attention_mask=mask,
        position_ids=positions(mask)[:, prompt_mask.shape[1] :],
        use_cache=True,
        **kv,
    ).last_hidden_state
    return last, hidden


COMPACT_SHARE = 0.125
"""Rows that ended leave the batch (and the KV cache) once they are this share of it."""


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    row_keys: torch.Tensor | None = None,
    greedy: bool = False,
    share_prefix: bool = True,
    compact: bool = True,
) -> Generation:
    """Sample one response per prompt (token ids, already in the chat template). `eos_id`: the
    stop token, or several (EOS and the template's end-of-turn token). Uniforms come from
    `generator`, or with `row_keys` ((B, 2), `stream_keys`) from each row's own stream at the
    decode step, so a row draws the same tokens in any batch (up to the logits' rounding).

    Two savings that change no distribution (off for comparison in `bench/`): with
    `share_prefix` a prompt repeated in the batch (k samples per prompt) is prefilled once and
    its KV cache rows copied; with `compact` rows that emitted EOS leave the batch and the cache
    once they are `COMPACT_SHARE` of it, so the cost follows the tokens actually sampled rather
    than batch × the longest response.
    """
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if temperature <= 0 and not greedy:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy=True instead")
    if row_keys is not None and (generator is not None or row_keys.shape != (len(prompts), 2)):
        raise ValueError(
            f"row_keys: ({len(prompts)}, 2), a stream_keys row per prompt, no generator"
        )
    device = next(model.parameters()).device
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=device)
    was_training = model.training
    model.eval()
    ids, prompt_mask = left_pad(prompts, pad_id)
    ids, prompt_mask = ids.to(device), prompt_mask.to(device)
    keys = None if row_keys is None else row_keys.to(device)
    b, width = ids.shape
    p_ids, p_mask, inverse = ids, prompt_mask, None  # the rows the prefill runs on
    if share_prefix:
        distinct, rows = dedupe(prompts)
        if len(distinct) < b:  # same width: the longest prompt is among the distinct ones
            p_ids, p_mask = (t.to(device) for t in left_pad(distinct, pad_id))
            inverse = torch.tensor(rows, device=device)
    # preallocated: a growing cache re-copies every key/value tensor at every step
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    kv = {cache_kwarg(type(model)): cache}
    out = model(
        input_ids=p_ids,
        attention_mask=p_mask,
        position_ids=positions(p_mask),
        **kv,
        use_cache=True,
        cache_position=torch.arange(width, device=device),
        logits_to_keep=1,
    )
    logits = out.logits[:, -1].float()
    if inverse is not None:
        logits = logits[inverse]
        cache.reorder_cache(inverse)
    mask = prompt_mask
    next_pos = mask.sum(-1, keepdim=True)  # (n, 1), over the n rows still in the batch
    active = torch.arange(b, device=device)  # each such row's index in the batch
    ended = torch.zeros(b, dtype=torch.bool, device=device)  # over those rows
    response = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    n_steps = 0
    for step in range(max_new_tokens):
        u = None if keys is None or greedy else stream_uniforms(keys, step)
        tok = (
            logits.argmax(-1) if greedy else sample_categorical(logits / temperature, generator, u)
        )
        response[active, step] = torch.where(ended, pad_id, tok)
        ended = ended | torch.isin(tok, stops)
        n_steps = step + 1
        n_ended = int(ended.sum())
        if n_ended == len(active) or step == max_new_tokens - 1:
            break
        if compact and n_ended and n_ended >= COMPACT_SHARE * len(active):
            keep = (~ended).nonzero().squeeze(-1)
            cache.reorder_cache(keep)
            active, tok, mask, next_pos = active[keep], tok[keep], mask[keep], next_pos[keep]
            ended = ended[keep]
            keys = None if keys is None else keys[keep]
        # rows that ended but stay in the batch run on; PAD is written for them and masked
        mask = torch.cat([mask, (~ended | torch.isin(tok, stops)).long()[:, None]], dim=1)
        out = model(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            **kv,
            use_cache=True,
            cache_position=torch.tensor([width + step], device=device),
        )
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    model.train(was_training)
    response = response[:, :n_steps]
    # a token is real if no stop token came strictly before it (PAD = EOS is fine: the PAD
    # written after a row's stop token comes after it)
    eos = torch.isin(response, stops)
    before = torch.cumsum(eos.long(), dim=1) - eos.long()
    response_mask = before == 0
    response = torch.where(response_mask, response, torch.full_like(response, pad_id))
    return Generation(
        sequences=torch.cat([ids, response], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        prompt_width=width,
        response=response,
        response_mask=response_mask,
        ended=eos.any(dim=1),
    )


def sample_responses(
    model: torch.nn.Module,
    template: ChatTemplate,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    split_groups: int = 0,
) -> list[dict[str, Any]]:
    """Ancestral samples (see `generate`) for text prompts, each on its own random stream
    (`seed`, its position in `prompts`), so the draws do not depend on `batch_size`. With
    `split_groups` g > 0 under torchrun (every rank calls), each rank samples its share of the
    groups of g consecutive prompts and every rank returns the whole list one process draws.

    Returns `{"prompt", "response", "ended_with_eos", "n_tokens"}` per prompt.
    """
    g = max(1, split_groups)
    n_groups = -(-len(prompts) // g)
    groups = shard(n_groups) if split_groups else range(n_groups)
    rows = [i for j in groups for i in range(j * g, min((j + 1) * g, len(prompts)))]
    out: list[dict[str, Any]] = []
    bar = Progress(len(rows), "sampling: prompts")
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        gen = generate(
            model,
            [template.prompt_ids(prompts[i]) for i in chunk],
            max_new_tokens=max_new_tokens,
            eos_id=template.stop_ids,
            pad_id=template.pad_id,
            temperature=temperature,
            row_keys=stream_keys(seed, torch.tensor(chunk)),
        )
        lengths, ended = gen.lengths.tolist(), gen.ended.tolist()
        for i, row, e, n in zip(chunk, gen.response.tolist(), ended, lengths, strict=True):
            text = template.decode(row[:n])
            out.append({"prompt": prompts[i], "response": text, "ended_with_eos": e, "n_tokens": n})
        bar.update(len(chunk))
    bar.close()
    if not split_groups:
        return out
    mine = [out[k * g : (k + 1) * g] for k in range(len(groups))]
    return [s for group in gather_shards(mine, n_groups) for s in group]
