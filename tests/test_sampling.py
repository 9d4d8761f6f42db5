"""The shared sampler: cached decoding equals full recompute, padding changes nothing, draws
follow the distribution, EOS and masks are where they should be."""

import numpy as np
import pytest
import torch

from lmpipe.config import ModelParams
from lmpipe.model import build_model
from lmpipe.sampling import generate, sample_categorical

SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|prompt|>": 3, "<|response|>": 4}
PAD, EOS = 0, 2


def tiny(arch: str, seed: int = 0):
    cfg = ModelParams(arch=arch, d_model=32, n_layers=2, n_heads=4, context=64)
    return build_model(cfg, 64, SPECIAL, seed=seed).eval()


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """No cache, no padding: argmax of a full forward pass at every step."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1]
        t = int(logits.argmax())
        out.append(t)
        if t == EOS:
            break
        seq.append(t)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_greedy_with_left_padding_equals_full_recompute(arch):
    model = tiny(arch)
    prompts = [[1, 3, 10, 11, 12, 13, 4], [1, 3, 20, 4], [1, 3, 30, 31, 4]]
    g = generate(model, prompts, max_new_tokens=12, eos_id=EOS, pad_id=PAD, greedy=True)
    assert g.sequences.shape == (3, g.prompt_width + g.response.shape[1])
    for i, p in enumerate(prompts):
        ref = greedy_reference(model, p, 12)
        n = int(g.lengths[i])
        assert g.response[i, :n].tolist() == ref
        assert bool(g.ended[i]) == (ref[-1] == EOS)
        assert (g.response[i, n:] == PAD).all()
        # the attention mask marks the prompt's real tokens and the response, nothing else
        assert int(g.attention_mask[i].sum()) == len(p) + n
    plain = generate(
        model,
        prompts * 2,
        max_new_tokens=12,
        eos_id=EOS,
        pad_id=PAD,
        greedy=True,
        share_prefix=False,
        compact=False,
    )
    both = generate(model, prompts * 2, max_new_tokens=12, eos_id=EOS, pad_id=PAD, greedy=True)
    assert torch.equal(plain.response[:3], g.response)
    assert torch.equal(both.response, plain.response)


def test_sampling_is_seeded_and_stops_at_eos():
    model = tiny("llama", seed=3)
    prompts = [[1, 3, 7, 4]] * 16

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(model, prompts, max_new_tokens=20, eos_id=EOS, pad_id=PAD, generator=gen)

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a.response, b.response)
    assert not torch.equal(a.response, c.response)
    for row, mask, ended in zip(a.response, a.response_mask, a.ended, strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # real tokens form a prefix
        assert (row[: n - 1] != EOS).all()
        assert bool(ended) == (int(row[n - 1]) == EOS)


def test_sample_categorical_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().expand(40_000, -1)
    draws = sample_categorical(logits, torch.Generator().manual_seed(0))
    freq = np.bincount(draws.numpy(), minlength=5) / len(draws)
    se = np.sqrt(probs.numpy() * (1 - probs.numpy()) / len(draws))
    assert np.all(np.abs(freq - probs.numpy()) <= 4 * se + 1e-12)
    assert freq[4] == 0  # a zero-probability token is never drawn


def test_generate_rejects_bad_arguments():
    model = tiny("llama")
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, [], max_new_tokens=4, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], max_new_tokens=4, eos_id=EOS, pad_id=PAD, temperature=0)


@pytest.mark.parametrize("share", [0.0, 0.3])
def test_batch_samples_follow_the_sequence_distribution(share, monkeypatch):
    """Repeated prompts (one shared prefill) and rows that leave the batch at EOS (compaction)
    still draw each whole response with the model's probability: empirical frequencies of every
    possible response against exact probabilities from full forward passes."""
    from itertools import product

    import lmpipe.sampling

    monkeypatch.setattr(lmpipe.sampling, "COMPACT_SHARE", share)  # 0: leave at every EOS
    reorders: list[int] = []  # rows kept at each cache reorder (prefix copy, then compactions)
    reorder = lmpipe.sampling.StaticCache.reorder_cache

    def spy(cache, rows):
        reorders.append(len(rows))
        reorder(cache, rows)

    monkeypatch.setattr(lmpipe.sampling.StaticCache, "reorder_cache", spy)
    cfg = ModelParams(d_model=32, n_layers=2, n_heads=2, context=16, init_std=0.3)
    model = build_model(cfg, 7, SPECIAL, seed=0).eval()
    prompts, n, new = [[1, 3, 5, 6, 4], [1, 3, 6, 4]], 12_000, 3
    batch = [prompts[i % 2] for i in range(2 * n)]  # interleaved: both prefixes shared
    gen = generate(
        model,
        batch,
        max_new_tokens=new,
        eos_id=EOS,
        pad_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    assert reorders[0] == 2 * n and len(reorders) >= (3 if share == 0 else 1), reorders
    for j, prompt in enumerate(prompts):
        seen: dict[tuple[int, ...], int] = {}
        for i in range(j, 2 * n, 2):
            resp = tuple(gen.response[i, : int(gen.lengths[i])].tolist())
            seen[resp] = seen.get(resp, 0) + 1
        # every response: up to `new` tokens, EOS only last
        support = [
            r
            for k in range(1, new + 1)
            for r in product(range(7), repeat=k)
            if EOS not in r[:-1] and (r[-1] == EOS or k == new)
        ]
        assert set(seen) <= set(support)
        with torch.no_grad():
            probs = []
            for r in support:
                seq = torch.tensor([prompt + list(r)])
                logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
                pos = range(len(prompt) - 1, len(prompt) - 1 + len(r))
                probs.append(float(sum(logp[p, t] for p, t in zip(pos, r, strict=True)).exp()))
        probs_t = np.array(probs)
        assert abs(probs_t.sum() - 1) < 1e-6
        freq = np.array([seen.get(r, 0) for r in support]) / n
        se = np.sqrt(probs_t * (1 - probs_t) / n)
        assert np.all(np.abs(freq - probs_t) <= 5 * se + 2e-3), np.abs(freq - probs_t).max()
