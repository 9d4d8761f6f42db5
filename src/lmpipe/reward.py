"""Reward modelling: pairwise labels from a gold scorer, the Bradley–Terry loss, the scalar-head
model, and the normalised scorer that RL and evaluation use.

The reward model is `AutoModelForSequenceClassification` (one label) on the SFT backbone, over
the prompt and answer in the SFT template (`ChatTemplate.pair`; plain: `BOS PROMPT prompt
RESPONSE response EOS`). Sequence lengths, not PAD ids, say where padding starts (PAD may equal
EOS). Its scalar head reads either the
hidden state of the last non-pad token (`pooling: last`, what plain transformers computes) or
every response position, averaged (`pooling: mean`); the choice is stored in the model's
config.json as `lmpipe_reward_pooling`, so `sequence_scores` scores a saved model the way it was
trained. Its raw score r is normalised as gain·r + bias, fitted to mean 0, std 1 on fresh samples
of the SFT policy; the constants live in `lmpipe.json`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from lmpipe.batches import PairBatches
from lmpipe.chat import ChatTemplate, load_template
from lmpipe.data.sources import DataError, iter_jsonl
from lmpipe.model import attention_for, context_length, read_manifest
from lmpipe.sampling import dedupe, left_pad, run_shared_prompts, sample_responses

# --------------------------------------------------------------------------- labelling


def preference_prob(g_a: np.ndarray, g_b: np.ndarray, tau: float) -> np.ndarray:
    """P(a ≻ b) under the Bradley–Terry labeller σ((g(a) − g(b)) / τ); τ = 0 is exact
    (ties are a coin flip)."""
    diff = np.asarray(g_a, dtype=np.float64) - np.asarray(g_b, dtype=np.float64)
    if tau == 0:
        return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    return 1.0 / (1.0 + np.exp(-diff / tau))


def label_pairs(gold: Sequence[float], tau: float, rng: np.random.Generator) -> list[dict]:
    """Every pair (i, j), i < j, of one prompt's responses, labelled by a Bradley–Terry draw.

    Returns `{"chosen", "rejected", "p_chosen"}` with response indices and the labeller's
    probability of the choice it made.
    """
    g = np.asarray(gold, dtype=np.float64)
    out = []
    for i in range(len(g)):
        for j in range(i + 1, len(g)):
            p = float(preference_prob(g[i], g[j], tau))
            i_wins = rng.random() < p
            c, r = (i, j) if i_wins else (j, i)
            out.append({"chosen": c, "rejected": r, "p_chosen": p if i_wins else 1 - p})
    return out


def expected_agreement(g_a: np.ndarray, g_b: np.ndarray, tau: float) -> float:
    """Expected share of labels that agree with the gold order, over pairs whose gold differs."""
    diff = np.abs(np.asarray(g_a) - np.asarray(g_b))
    diff = diff[diff > 0]
    if diff.size == 0:
        return float("nan")
    return float(np.mean(preference_prob(diff, np.zeros_like(diff), tau)))


# --------------------------------------------------------------------------- loss


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0
) -> torch.Tensor:
    """Per-pair −log σ(r_chosen − r_rejected − margin) (softplus form: stable for any gap)."""
    return F.softplus(-(r_chosen - r_rejected - margin))


# --------------------------------------------------------------------------- data


def encode_for_reward(
    template: ChatTemplate, prompt: str, response: str, context: int
) -> list[int] | None:
    """The prompt, the answer and its end-of-turn token in the template (plain: `BOS PROMPT
    prompt RESPONSE response EOS`), or None when it does not fit the context."""
    ids = template.pair(prompt, response)[0]
    return ids if len(ids) <= context else None


@dataclass(frozen=True)
class PreferenceExample:
    chosen: list[int]
    rejected: list[int]


@dataclass(frozen=True)
class PreferenceGroup:
    """Labelled pairs over distinct sequences: (chosen, rejected) indices into `seqs`. A batch
    of groups scores each sequence once however many of its pairs it holds.

    `reward.batching: prompt` (the default) makes one group per prompt (`group_pairs`): k
    samples give up to k(k−1)/2 pairs for k forward passes instead of k(k−1), and all
    comparisons of a prompt enter one gradient step together, as InstructGPT trains its reward
    model (Ouyang et al. 2022). `reward.batching: pair` makes one group per pair (`of_pair`)."""

    seqs: tuple[tuple[int, ...], ...]
    pairs: tuple[tuple[int, int], ...]

    @classmethod
    def of_pair(cls, example: PreferenceExample) -> PreferenceGroup:
        return cls((tuple(example.chosen), tuple(example.rejected)), ((0, 1),))


def group_pairs(
    examples: Sequence[PreferenceExample], keys: Sequence[str]
) -> list[PreferenceGroup]:
    """Pairs with the same key (their prompt) into one group, identical sequences merged;
    groups in order of first appearance."""
    seqs: dict[str, dict[tuple[int, ...], int]] = {}
    pairs: dict[str, list[tuple[int, int]]] = {}
    for e, key in zip(examples, keys, strict=True):
        index = seqs.setdefault(key, {})
        c = index.setdefault(tuple(e.chosen), len(index))
        r = index.setdefault(tuple(e.rejected), len(index))
        pairs.setdefault(key, []).append((c, r))
    return [PreferenceGroup(tuple(seqs[k]), tuple(pairs[k])) for k in seqs]


def encode_pairs(
    template: ChatTemplate, rows: Sequence[dict[str, Any]], context: int
) -> dict[str, list[tuple[PreferenceExample, dict[str, Any]]]]:
    """Rows with `prompt`, `chosen`, `rejected` and `split` (train/val), encoded; a pair whose
    chosen or rejected sequence does not fit the context is left out."""
    out: dict[str, list[tuple[PreferenceExample, dict[str, Any]]]] = {"train": [], "val": []}
    cache: dict[tuple[str, str], list[int] | None] = {}  # k samples make k(k-1)/2 pairs

    def encode(prompt: str, response: str) -> list[int] | None:
        key = (prompt, response)
        if key not in cache:
            cache[key] = encode_for_reward(template, prompt, response, context)
        return cache[key]

    for p in rows:
        c = encode(p["prompt"], p["chosen"])
        r = encode(p["prompt"], p["rejected"])
        if c and r:
            out[p["split"]].append((PreferenceExample(c, r), p))
    return out


def preference_groups(
    encoded: Sequence[tuple[PreferenceExample, dict[str, Any]]], batching: str
) -> list[PreferenceGroup]:
    """`encode_pairs` output of one split as training examples: one group per prompt
    (`batching: prompt`) or per pair (`pair`)."""
    if batching == "prompt":
        return group_pairs([e for e, _ in encoded], [p["prompt"] for _, p in encoded])
    if batching == "pair":
        return [PreferenceGroup.of_pair(e) for e, _ in encoded]
    raise ValueError(f"reward.batching {batching!r} is not 'pair' or 'prompt'")


@dataclass
class PreferenceBatch:
    """Distinct sequences, right-padded to one width, and each pair's (chosen, rejected) rows."""

    input_ids: torch.Tensor
    chosen: torch.Tensor  # (P,) row of each pair's chosen sequence
    rejected: torch.Tensor  # (P,)
    lengths: torch.Tensor  # (B,) tokens of each row before its padding

    @property
    def n_targets(self) -> int:  # the loop divides the summed loss by this: pairs
        return int(self.chosen.numel())

    def to(self, device: torch.device) -> PreferenceBatch:
        nb = device.type == "cuda"
        return PreferenceBatch(
            *(
                t.to(device, non_blocking=nb)
                for t in (self.input_ids, self.chosen, self.rejected, self.lengths)
            )
        )


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    width = max(map(len, seqs))
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def collate_preferences(groups: Sequence[PreferenceGroup], pad_id: int) -> PreferenceBatch:
    seqs: list[Sequence[int]] = []
    chosen, rejected = [], []
    for g in groups:
        chosen += [len(seqs) + c for c, _ in g.pairs]
        rejected += [len(seqs) + r for _, r in g.pairs]
        seqs += g.seqs
    lengths = torch.tensor([len(s) for s in seqs])
    return PreferenceBatch(
        right_pad(seqs, pad_id), torch.tensor(chosen), torch.tensor(rejected), lengths
    )


class PreferenceBatches(PairBatches):
    """Seeded epochs over preference groups, `batch_size` groups a micro-batch (same sampler,
    state and rank slicing as SFT)."""

    def collate(self, groups: Sequence[PreferenceGroup]) -> PreferenceBatch:
        return collate_preferences(groups, self.pad_id)


def read_preference_file(path: str | Path) -> list[dict[str, str]]:
    """A JSONL of `prompt`, `chosen`, `rejected` strings; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"preference.path {path} does not exist; point it at a JSONL file")
    rows = list(
        iter_jsonl(
            path.read_text(encoding="utf-8"),
            str(path),
            ("prompt", "chosen", "rejected"),
            "preference.path",
        )
    )
    if len(rows) < 2:
        raise DataError(f"{path}: {len(rows)} preference rows; at least 2 are needed")
    return rows


# --------------------------------------------------------------------------- model


POOLINGS = ("last", "mean")


def build_reward_model(
    sft_dir: str | Path,
    seed: int,
    pooling: str = "last",
    response_token_id: int | None = None,
    marker_last: bool = False,
) -> PreTrainedModel:
    """The SFT backbone with a fresh scalar head, N(0, 1/(d+1)) as in Ziegler et al.; dropout
    off (eval-mode numerics in training too). `pooling` (see `sequence_scores`) is written to
    the config, so it is saved with the model, with the token that starts the answer
    (`ChatTemplate.response_marker`: the id, and whether its last occurrence counts; default:
    from the folder's template)."""
    if pooling not in POOLINGS:
        raise ValueError(f"reward pooling {pooling!r} is not one of {POOLINGS}")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # transformers reports the new head as a MISSING weight to train "on your downstream task":
    # the head is new on purpose and initialised below, so the warning would only mislead
    hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):  # one seeded stream: loading, then the head
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(sft_dir),
                num_labels=1,
                attn_implementation=attention_for(),
                use_safetensors=True,
            )
            head = model.score
            torch.nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features + 1))
    finally:
        hf_logging.set_verbosity(verbosity)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)
    model.config.lmpipe_reward_pooling = pooling
    if response_token_id is None and pooling != "last":
        marker = load_template(sft_dir).response_marker
        response_token_id, marker_last = marker if marker else (None, False)
    if response_token_id is not None:  # mean pooling and prompt sharing read it
        model.config.lmpipe_response_token_id = response_token_id
        model.config.lmpipe_response_marker_last = marker_last
    return model


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
    RESPONSE, up to and including the end-of-turn token), averaged. A sequence without the
    marker is averaged over all its tokens.
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
    if getattr(config, "lmpipe_reward_pooling", "last") == "last":
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
    weight = keep.float()
    return (per_token * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)


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
        prompt_ids, prompt_mask, response_ids, response_mask.long(),
        torch.tensor(owner, device=device), None if last else response_id,
    )  # fmt: skip


def _shared_prompt_scores(model: torch.nn.Module, layout: PromptLayout) -> torch.Tensor:
    """`sequence_scores` with each distinct prompt run once (`run_shared_prompts`): equal to
    the plain pass up to float rounding (tests check scores and gradients)."""
    owner, r_mask = layout.owner, layout.response_mask
    _, hidden = run_shared_prompts(
        model.base_model, layout.prompt_ids, layout.prompt_mask, owner, layout.response_ids, r_mask
    )
    per_token = model.score(hidden).squeeze(-1).float()  # (B, R)
    config = model.config
    if getattr(config, "lmpipe_reward_pooling", "last") == "last":
        return per_token[torch.arange(len(owner), device=owner.device), r_mask.sum(-1) - 1]
    weight = r_mask.bool()
    if layout.response_id is not None:  # as the plain pass: a marker inside an answer
        weight = weight & (layout.response_ids != layout.response_id)
    weight = weight.float()
    return (per_token * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)


def preference_loss_sum(margin: float = 0.0):
    """`loss_sum(model, batch)` for the training loop: summed Bradley–Terry loss of a batch."""

    def loss_sum(model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        r = sequence_scores(model, batch.input_ids, lengths=batch.lengths)
        return bradley_terry_loss(r[batch.chosen], r[batch.rejected], margin).sum()

    return loss_sum


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
    scores = torch.zeros(len(distinct), dtype=torch.float64)
    was_training = model.training
    model.eval()
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        ids = right_pad([distinct[j] for j in rows], pad_id).to(device)
        lengths = torch.tensor([len(distinct[j]) for j in rows], device=device)
        scores[rows] = sequence_scores(model, ids, lengths=lengths).cpu().double()
    model.train(was_training)
    return scores[slots].numpy()


def fit_normalisation(raw: np.ndarray) -> dict[str, float]:
    """gain, bias with gain·raw + bias of mean 0 and std 1 on `raw`."""
    raw = np.asarray(raw, dtype=np.float64)
    std = float(raw.std())
    if raw.size < 2 or not math.isfinite(std) or std < 1e-8:
        raise ValueError(
            f"cannot normalise the reward: {raw.size} scores with std {std:.3g}; "
            "the reward model gives (nearly) one score to everything — train longer or check "
            "the preference labels"
        )
    return {"gain": 1.0 / std, "bias": -float(raw.mean()) / std}


@dataclass
class RewardModel:
    """A trained reward model with its normalisation: what RL and evaluation call."""

    model: PreTrainedModel
    template: ChatTemplate
    gain: float
    bias: float

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> RewardModel:
        manifest = read_manifest(directory)
        norm = manifest.get("normalization")
        if not norm:
            raise FileNotFoundError(
                f"{directory} has no reward normalisation in lmpipe.json; rerun the reward stage"
            )
        model = AutoModelForSequenceClassification.from_pretrained(
            str(directory), attn_implementation=attention_for(device), use_safetensors=True
        )
        template = load_template(directory)
        return cls(model.to(device).eval(), template, norm["gain"], norm["bias"])

    @property
    def pad_id(self) -> int:
        return self.template.pad_id

    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 128) -> np.ndarray:
        """Normalised scores of token sequences in the template (ending in EOS)."""
        return self.gain * raw_scores(self.model, seqs, self.pad_id, batch_size) + self.bias

    def score_text(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        ctx = context_length(self.model)
        seqs = []
        for p, r in zip(prompts, responses, strict=True):
            ids = encode_for_reward(self.template, p, r, 10**9)
            seqs.append(ids[-ctx:])  # a too-long text is judged on its end
        return self.score_ids(seqs)


def cluster_se(values: Sequence[float] | np.ndarray, clusters: Sequence[Any]) -> float:
    """Standard error of the mean of `values` whose observations are correlated within clusters
    (the pairs of one prompt share its responses): the cluster-robust estimate, NaN below two
    clusters. Independent observations (one per cluster) give the usual s/√n."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan")
    ids = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)[1]
    n_c = int(ids.max()) + 1
    if n_c < 2:
        return float("nan")
    sums = np.bincount(ids, weights=x - x.mean(), minlength=n_c)
    return float(np.sqrt(n_c / (n_c - 1) * np.sum(sums**2)) / x.size)


def gold_agreement(
    r_chosen: np.ndarray,
    r_rejected: np.ndarray,
    g_chosen: np.ndarray,
    g_rejected: np.ndarray,
    min_gold_gap: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: whether the scores order it as gold does, and whether gold differs enough
    (at least `min_gold_gap`) for that to count; gold ties are left out, not disagreements."""
    gc, gr = np.asarray(g_chosen), np.asarray(g_rejected)
    sel = np.abs(gc - gr) >= min_gold_gap
    return np.sign(np.asarray(r_chosen) - np.asarray(r_rejected)) == np.sign(gc - gr), sel


def calibration_error(p_first: np.ndarray, first_wins: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of P(first ≻ second) against outcomes: |mean predicted −
    frequency| per equal-width bin of the prediction, weighted by the bin's share. Each pair
    counts in both orders (p, y) and (1 − p, 1 − y), so it does not depend on which response
    is called first."""
    p = np.concatenate([np.asarray(p_first, float), 1 - np.asarray(p_first, float)])
    y = np.concatenate([np.asarray(first_wins, float), 1 - np.asarray(first_wins, float)])
    if not p.size:
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            err += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(err)


def sample_gold_order(
    scores: np.ndarray, gold: np.ndarray, prompt_index: Sequence[int], min_gold_gap: float = 0.1
) -> dict[str, float]:
    """How often the reward model orders two samples of the same prompt as gold does, over
    every such pair whose gold differs by at least `min_gold_gap` (a sample without a score,
    NaN, is left out): its accuracy on a policy's own samples, with the SE by prompt."""
    scores, gold = np.asarray(scores, float), np.asarray(gold, float)
    idx = np.asarray(prompt_index)
    a_all, b_all = [], []
    for p in np.unique(idx):
        rows = np.flatnonzero((idx == p) & np.isfinite(scores))
        a, b = np.triu_indices(len(rows), k=1)
        a_all.append(rows[a])
        b_all.append(rows[b])
    a, b = np.concatenate(a_all or [[]]).astype(int), np.concatenate(b_all or [[]]).astype(int)
    agree, sel = gold_agreement(scores[a], scores[b], gold[a], gold[b], min_gold_gap)
    if not sel.any():
        return {"accuracy": float("nan"), "se": float("nan"), "pairs": 0}
    return {"accuracy": float(agree[sel].mean()), "se": cluster_se(agree[sel], idx[a][sel]),
            "pairs": int(sel.sum())}  # fmt: skip


def pair_metrics(
    r_chosen: np.ndarray,
    r_rejected: np.ndarray,
    g_chosen: np.ndarray,
    g_rejected: np.ndarray,
    min_gold_gap: float = 0.1,
    prompts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy against the labels, and against the gold order where gold differs enough; with
    the pairs' prompts, each with its standard error by prompt."""
    rc, rr = np.asarray(r_chosen), np.asarray(r_rejected)
    agree, sel = gold_agreement(rc, rr, g_chosen, g_rejected, min_gold_gap)
    p_chosen = 1 / (1 + np.exp(-(rc - rr)))  # the Bradley-Terry model's P(chosen ≻ rejected)
    gold_wins = np.asarray(g_chosen) > np.asarray(g_rejected)
    out = {
        "val_accuracy": float(np.mean(rc > rr)),
        "gold_order_accuracy": float(np.mean(agree[sel])) if sel.any() else float("nan"),
        "gold_order_pairs": int(sel.sum()),
        "calibration_error_labels": calibration_error(p_chosen, np.ones_like(p_chosen)),
        "calibration_error_gold": calibration_error(p_chosen[sel], gold_wins[sel]),
    }
    if prompts is not None:
        clusters = np.asarray(prompts, dtype=object)
        out["val_accuracy_se"] = cluster_se(rc > rr, clusters)
        out["gold_order_accuracy_se"] = cluster_se(agree[sel], clusters[sel])
        out["val_prompts"] = len(set(prompts))
    return out


# --------------------------------------------------------------------------- preference data


def sample_and_label(
    model: torch.nn.Module,
    template: ChatTemplate,
    prompts: Sequence[str],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float,
    gold,
    tau: float,
    seed: int,
    batch_size: int = 256,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """k ancestral samples per prompt, scored by `gold`, every pair labelled by the noisy
    Bradley–Terry labeller. Responses cut at the length limit (no EOS) and duplicates are left
    out of pairs: RL never asks the reward model about a response without EOS.

    Returns (samples, pairs); pairs carry the texts, both gold scores and the labeller's p.
    """
    repeated = [p for p in prompts for _ in range(k)]
    samples = sample_responses(
        model, template, repeated, max_new_tokens, temperature, seed=seed, batch_size=batch_size
    )
    ended = [s for s in samples if s["ended_with_eos"]]
    scores = gold([s["prompt"] for s in ended], [s["response"] for s in ended])
    for s, g in zip(ended, scores, strict=True):
        s["gold"] = float(g)
    rng = np.random.default_rng(seed)
    pairs: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        group, seen = [], set()
        for s in samples[i * k : (i + 1) * k]:
            if s["ended_with_eos"] and s["response"] not in seen:
                seen.add(s["response"])
                group.append(s)
        for lab in label_pairs([s["gold"] for s in group], tau, rng):
            c, r = group[lab["chosen"]], group[lab["rejected"]]
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": c["response"],
                    "rejected": r["response"],
                    "gold_chosen": c["gold"],
                    "gold_rejected": r["gold"],
                    "p_chosen": lab["p_chosen"],
                }
            )
    return samples, pairs


def val_prompts(prompts: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A seeded share of the distinct prompts, held out (pairs are split by prompt, so no
    prompt is in both train and val)."""
    distinct = sorted(set(prompts))
    n_val = max(1, round(fraction * len(distinct)))
    if n_val >= len(distinct):
        raise DataError(
            f"{len(distinct)} distinct prompts cannot be split with val_fraction {fraction}; "
            "add prompts or lower preference.val_fraction"
        )
    order = np.random.default_rng(seed).permutation(len(distinct))
    return {distinct[i] for i in order[:n_val]}


SIDES = ("chosen", "rejected")


def bag_of_words_baseline(train: Sequence[dict], val: Sequence[dict]) -> dict[str, Any]:
    """An honest reference for the reward model: logistic regression on word-count differences
    (chosen − rejected) of the same training pairs, scored like the reward model on val.

    Rows carry `chosen`, `rejected` (texts) and `gold_chosen`, `gold_rejected`.
    """
    from scipy.sparse import vstack
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    # each response is in up to k - 1 pairs: count the words of each distinct text once
    texts = list(dict.fromkeys(p[s] for rows in (train, val) for p in rows for s in SIDES))
    vec = CountVectorizer().fit(list(dict.fromkeys(p[s] for p in train for s in SIDES)))
    counts = vec.transform(texts)
    row = {t: i for i, t in enumerate(texts)}

    def diff(rows):
        return counts[[row[p["chosen"]] for p in rows]] - counts[[row[p["rejected"]] for p in rows]]

    x = diff(train)
    clf = LogisticRegression(fit_intercept=False, max_iter=2000)
    clf.fit(vstack([x, -x]), np.r_[np.ones(x.shape[0]), np.zeros(x.shape[0])])
    margin = diff(val) @ clf.coef_.ravel()
    out = pair_metrics(
        margin, np.zeros_like(margin),
        [p["gold_chosen"] for p in val], [p["gold_rejected"] for p in val],
        prompts=[p.get("prompt", i) for i, p in enumerate(val)],
    )  # fmt: skip
    return {**out, "margin": margin}
