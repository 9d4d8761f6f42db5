"""RL math against closed forms and slow references: KL estimators, GAE, rewards and masks,
PPO losses, RLOO baselines, DPG importance-sampling estimates, log Z."""

import math

import numpy as np
import pytest
import torch

from lmpipe.rl import core
from lmpipe.sampling import Generation
from lmpipe.scoring import score_generation


def test_k1_and_k3_are_unbiased_on_a_categorical():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)  # reference
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[x], q.log()[x]
    k1, k3, k2 = core.kl_k1(lp, lq), core.kl_k3(lp, lq), core.kl_k2(lp, lq)
    for est in (k1, k3):
        se = float(est.std()) / math.sqrt(len(x))
        assert abs(float(est.mean()) - exact) < 4 * se
    assert (k3 >= 0).all() and (k1 < 0).any()  # k1 is negative on some samples, k3 never
    assert float(k3.std()) < float(k1.std())
    assert float(k2.mean()) != pytest.approx(exact, abs=1e-3)  # k2 is biased


def slow_gae(rewards, values, mask, gamma, lam):
    b = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    for i in range(b):
        n = int(mask[i].sum())
        last = 0.0
        for s in reversed(range(n)):
            next_v = float(values[i, s + 1]) if s + 1 < n else 0.0
            delta = float(rewards[i, s]) + gamma * next_v - float(values[i, s])
            last = delta + gamma * lam * last
            adv[i, s] = last
    return adv, (adv + values) * mask


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 1.0), (1.0, 0.0)])
def test_gae_matches_a_slow_reference(gamma, lam):
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(5, 7, generator=g, dtype=torch.float64)
    values = torch.randn(5, 7, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1, 5, 6])
    mask = torch.arange(7)[None] < lengths[:, None]
    rewards = rewards * mask
    adv, ret = core.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = slow_gae(rewards, values * mask, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()  # padding carries nothing
    if lam == 1.0 and gamma == 1.0:  # λ = 1: A_t = Σ_{s≥t} r_s − V_t
        want = rewards.flip(1).cumsum(1).flip(1) - values
        torch.testing.assert_close(adv[mask], want[mask])


def test_token_rewards_put_the_score_on_the_last_real_token():
    k1 = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    r = core.token_rewards(torch.tensor([2.0, -1.0]), k1, mask, beta=0.5)
    torch.testing.assert_close(
        r, torch.tensor([[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.25 - 1.0, 0.0, 0.0, 0.0]])
    )


def test_missing_eos_penalty_and_masks():
    # rows: ended after 2 tokens (EOS=2), truncated at the limit, ended at once
    response = torch.tensor([[7, 2, 0], [7, 8, 9], [2, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    gen = Generation(
        sequences=torch.cat([torch.ones(3, 2, dtype=torch.long), response], 1),
        attention_mask=torch.cat([torch.ones(3, 2, dtype=torch.long), mask.long()], 1),
        prompt_width=2,
        response=response,
        response_mask=mask,
        ended=torch.tensor([True, False, True]),
    )
    seen = []

    def score_fn(prompts, responses):
        seen.extend(responses)
        return np.array([10.0 * len(r) for r in responses])

    scores, proxy = score_generation(gen, [[1, 1]] * 3, score_fn, penalty=-3.0)
    assert seen == [[7, 2], [2]]  # the truncated response never reaches the reward model
    assert scores.tolist() == [20.0, -3.0, 10.0]
    assert math.isnan(proxy[1])
    seen.clear()
    scores, _ = score_generation(gen, [[1, 1]] * 3, score_fn, penalty=None)
    assert seen == [[7, 2], [7, 8, 9], [2]] and scores.tolist() == [20.0, 30.0, 10.0]


def test_whitening_and_masked_stats():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    w = core.whiten(x, mask)
    real = w[mask]
    assert abs(float(real.mean())) < 1e-6 and abs(float(real.std()) - 1) < 1e-4
    assert (w[~mask] == 0).all()
    ws = core.whiten(x, mask, shift_mean=False)
    # without the shift: scaled to unit std, the mean kept where it was
    torch.testing.assert_close(ws[mask] - ws[mask].mean(), real, atol=1e-5, rtol=0)
    assert float(ws[mask].mean()) == pytest.approx(float(x[mask].mean()), rel=1e-5)


def test_ppo_losses():
    logp = torch.tensor([[0.0, math.log(2.0)]])
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    # ratio 1 and 2 with positive advantage: the second is clipped at 1.2
    s = core.ppo_policy_loss(logp, old, torch.ones(1, 2), mask, clip=0.2)
    assert float(s.loss) == pytest.approx(-(1.0 + 1.2) / 2)
    assert float(s.clipfrac) == pytest.approx(0.5)
    assert float(s.ratio_mean) == pytest.approx(1.5)
    v, vl_clip = core.ppo_value_loss(
        torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]), mask, clip=0.2
    )
    # first: unclipped error 1, clipped (0.2 − 0)² = 0.04 → max 1; second: 1 vs 1 → 1
    assert float(v) == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    assert 0 <= float(vl_clip) <= 1


def test_rloo_advantages_leave_one_out():
    r = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    a = core.rloo_advantages(r)
    torch.testing.assert_close(a[0], torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))
    torch.testing.assert_close(a.sum(1), torch.zeros(2))  # baselines make each group sum to 0
    with pytest.raises(ValueError, match="at least 2"):
        core.rloo_advantages(torch.ones(3, 1))


def test_dpg_estimates_on_an_exact_categorical():
    """With q sampled exactly (weights on the support), the IS estimates equal the closed forms."""
    g = torch.Generator().manual_seed(2)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    pi = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    unnorm = torch.tensor([0.2, 0.6, 1.0, 0.2], dtype=torch.float64)  # P(x), Z = 2
    p = unnorm / unnorm.sum()
    x = torch.multinomial(q, 400_000, replacement=True, generator=g)[None]
    est = core.dpg_estimates(unnorm.log()[x], q.log()[x], pi.log()[x])
    assert float(est.log_z[0]) == pytest.approx(math.log(2.0), abs=0.01)
    assert float(est.kl_p_pi[0]) == pytest.approx(float((p * (p / pi).log()).sum()), abs=0.01)
    assert float(est.kl_p_q[0]) == pytest.approx(float((p * (p / q).log()).sum()), abs=0.01)
    assert float(est.tvd_p_pi[0]) == pytest.approx(float(0.5 * (p - pi).abs().sum()), abs=0.01)
    # the GDC++ weight has mean ≈ 0 under q (the baseline makes it centred)
    w = core.dpg_weights(unnorm.log()[x], q.log()[x], pi.log()[x], est.log_z)
    assert abs(float(w.mean())) < 0.01


def test_plain_log_z_estimate_is_biased_low_with_few_samples():
    """With π₀'s samples alone (no policy samples), log Ẑ is logsumexp(r/β) − log N: near the
    exact value with many samples, below it on average with few (Jensen)."""
    g = torch.Generator().manual_seed(3)
    beta = 2.0
    exact = 1 / (2 * beta**2)  # log E[exp(r/β)] for r ~ N(0, 1)
    r = torch.randn(3, 5000, generator=g, dtype=torch.float64)
    empty = torch.zeros(3, 0, dtype=torch.float64)
    log_z = core.mixture_log_z(r, torch.zeros_like(r), empty, empty, beta)
    assert torch.allclose(log_z, torch.full((3,), exact, dtype=torch.float64), atol=0.02)
    small = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    empty = torch.zeros(2000, 0, dtype=torch.float64)
    low = core.mixture_log_z(small, torch.zeros_like(small), empty, empty, 0.5)
    assert float(low.mean()) < 1 / (2 * 0.25)


@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept-probs", "remade-logits"])
def test_head_logprobs_match_log_softmax_and_its_gradients(
    monkeypatch, temperature, bias, keep_probs
):
    """The chunked head (logits never held whole) against autograd through a full
    log-softmax: log-probs, entropies and the gradients of hidden states, weight and bias,
    with chunks that do not divide the positions, and with either backward pass (the
    probabilities kept from the forward pass, or the logits remade chunk by chunk)."""
    from lmpipe import logprobs

    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 7 * 50)  # 7 positions a chunk
    monkeypatch.setattr(logprobs, "HEAD_KEEP_PROBS_BYTES", (1 << 20) if keep_probs else 0)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    with torch.no_grad():
        head.weight.normal_(0, 1.0, generator=g)
    hidden = torch.randn(3, 9, 16, generator=g, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 9), generator=g)
    upstream = torch.randn(3, 9, generator=g)

    logp, ent = logprobs.head_logprobs(hidden, head, tokens, temperature)
    (logp * upstream).sum().backward()
    got = [hidden.grad, head.weight.grad, *([head.bias.grad] if bias else [])]
    for t in (hidden, *head.parameters()):
        t.grad = None

    full = torch.log_softmax(head(hidden) / temperature, dim=-1)
    want_logp = full.gather(-1, tokens[..., None]).squeeze(-1)
    want_ent = -(full.exp() * full).sum(-1)
    (want_logp * upstream).sum().backward()
    want = [hidden.grad, head.weight.grad, *([head.bias.grad] if bias else [])]
    torch.testing.assert_close(logp, want_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, want_ent.detach(), rtol=0, atol=1e-5)
    assert not ent.requires_grad
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # no grad needed, no entropy asked: same log-probs, bit for bit
    with torch.no_grad():
        again, none = logprobs.head_logprobs(hidden, head, tokens, temperature, False)
    assert none is None and torch.equal(again, logp.detach())


@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept-probs", "remade-logits"])
def test_head_logprobs_under_bf16_autocast(monkeypatch, keep_probs):
    """Under bf16 autocast the head's product is bf16 and the softmax fp32, as autograd's
    path casts them; gradients come back in the inputs' dtypes."""
    from lmpipe import logprobs
    from lmpipe.logprobs import head_logprobs

    monkeypatch.setattr(logprobs, "HEAD_KEEP_PROBS_BYTES", (1 << 20) if keep_probs else 0)
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(32, 64, bias=False)
    hidden = torch.randn(40, 32, generator=g, requires_grad=True)
    tokens = torch.randint(0, 64, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = head_logprobs(hidden, head, tokens, 1.0, False)
        ref = torch.log_softmax(head(hidden).float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-4)
    logp.sum().backward()
    got = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad = head.weight.grad = None
    ref.sum().backward()
    assert got[0].dtype == hidden.dtype and got[1].dtype == head.weight.dtype
    torch.testing.assert_close(got[0], hidden.grad, rtol=0.02, atol=2e-3)
    torch.testing.assert_close(got[1], head.weight.grad, rtol=0.02, atol=2e-3)
