"""The shared sampler: cached decoding equals full recompute, padding changes nothing, draws
follow the distribution, EOS and masks are where they should be."""

import numpy as np
import pytest
import torch

from lmpipe.config import ModelParams
from lmpipe.model import build_model
from lmpipe.sampling import generate, pack, sample_categorical
from lmpipe.streams import stream_keys, stream_uniforms

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


@pytest.mark.parametrize(("share", "keyed"), [(0.0, False), (0.3, False), (0.0, True)])
def test_batch_samples_follow_the_sequence_distribution(share, keyed, monkeypatch):
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
        generator=None if keyed else torch.Generator().manual_seed(0),
        row_keys=stream_keys(0, torch.arange(2 * n)) if keyed else None,
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


M32 = 0xFFFFFFFF


def fmix32_reference(x: int) -> int:
    """MurmurHash3's finaliser on Python integers (no overflow anywhere)."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def uniform_reference(parts: list[int], t: int) -> float:
    a, b = 0x243F6A88, 0x85A308D3
    for w in parts:
        for half in (w & M32, (w >> 32) & M32):
            a = fmix32_reference(a ^ fmix32_reference(half))
            b = fmix32_reference(b ^ ((half * 0x9E3779B1) & M32))
    g = ((t + 1) * 0x9E3779B9) & M32
    return (fmix32_reference(a ^ fmix32_reference(b ^ g)) >> 8) / 2**24


def test_stream_uniforms_equal_the_integer_hash():
    """The int64 tensor arithmetic gives the bits of the 32-bit hash (large and negative parts,
    large counters): no overflow, no sign extension."""
    rng = np.random.default_rng(0)
    seeds = [0, 1, 2**31 - 1, 2**32 + 5, 2**62 + 12345, -7]
    rows = rng.integers(0, 2**40, size=len(seeds)).tolist()
    keys = stream_keys(torch.tensor(seeds), 3, torch.tensor(rows))
    for t in (0, 1, 999, 2**31):
        got = stream_uniforms(keys, t).tolist()
        want = [uniform_reference([s, 3, r], t) for s, r in zip(seeds, rows, strict=True)]
        assert got == want, t


def test_stream_uniforms_are_uniform_and_independent():
    """Over 2000 rows × 64 steps: the uniforms pass KS against U(0, 1), and pairs (row, step)
    with (row, step + 1) and with (row + 1, step) fill a 16 × 16 grid evenly (chi-square)."""
    from scipy import stats

    keys = stream_keys(1337, 5, torch.arange(2000), 0)
    u = torch.stack([stream_uniforms(keys, t) for t in range(64)], dim=1).double().numpy()
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):
        cells = (a * 16).astype(int) * 16 + (b * 16).astype(int)
        counts = np.bincount(cells.ravel(), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-3
    # a bad stream is caught: the same uniforms on every row fail the row-pair check
    same = np.repeat(u[:1], 2000, axis=0)
    cells = (same[:-1] * 16).astype(int) * 16 + (same[1:] * 16).astype(int)
    assert stats.chisquare(np.bincount(cells.ravel(), minlength=256)).pvalue < 1e-6


def test_keyed_rows_draw_the_same_alone_in_any_batch_and_order(monkeypatch):
    """Each row on its own stream: the same tokens sampled alone, in a batch of other (and
    longer, so left-padded) prompts, in reverse order, with or without compaction; seeded."""
    import lmpipe.sampling

    model = tiny("llama", seed=3)
    prompts = [[1, 3, 7, 4], [1, 3, 7, 8, 9, 10, 4], [1, 3, 7, 4], [1, 3, 11, 4]] * 3
    keys = stream_keys(42, 0, torch.arange(len(prompts)))
    kw = dict(max_new_tokens=16, eos_id=EOS, pad_id=PAD)

    def rows(g):
        return [r[:n] for r, n in zip(g.response.tolist(), g.lengths.tolist(), strict=True)]

    batch = generate(model, prompts, row_keys=keys, **kw)
    got = rows(batch)
    assert len({tuple(r) for r in got}) > 6  # the repeated prompts draw different responses
    assert got == rows(generate(model, prompts, row_keys=keys, **kw))
    alone = [
        rows(generate(model, [p], row_keys=keys[i : i + 1], **kw))[0] for i, p in enumerate(prompts)
    ]
    assert got == alone
    assert got[::-1] == rows(generate(model, prompts[::-1], row_keys=keys.flip(0), **kw))
    monkeypatch.setattr(lmpipe.sampling, "COMPACT_SHARE", 0.0)
    assert got == rows(generate(model, prompts, row_keys=keys, **kw))
    assert got == rows(generate(model, prompts, row_keys=keys, compact=False, **kw))
    other = generate(model, prompts, row_keys=stream_keys(43, 0, torch.arange(12)), **kw)
    assert rows(other) != got
    # pack lays the rows out as generate does: gathered rows rebuild the same batch
    packed = pack(prompts, got, batch.ended.tolist(), PAD)
    for field in ("sequences", "attention_mask", "response", "response_mask", "ended"):
        assert torch.equal(getattr(packed, field), getattr(batch, field)), field
    assert packed.prompt_width == batch.prompt_width
    with pytest.raises(ValueError, match="row_keys"):
        generate(model, prompts, row_keys=keys[:3], **kw)
