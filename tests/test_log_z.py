"""log Z and the distance to the posterior π* = π₀·exp(r/β)/Z on bandits where both are exact:
the estimate, its interval's coverage over seeds (β from 0.05 to 1, few and many samples), and a
KL estimate that is never negative."""

import math

import numpy as np
import pytest
import torch

from lmpipe.rl import core

K, P = 40, 16  # responses per prompt, prompts


def bandit(seed: int, beta: float, alpha: float):
    """P prompts of K responses: π₀ skewed (a few likely responses), rewards normal with one rare
    high-reward response a prompt (π₀ seldom draws the tail that dominates Z at small β), and a
    policy part-way to π*: π = (1 − α)·π₀ + α·π*. Exact log Z, J and KL(π‖π*) per prompt."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(P, K, generator=g, dtype=torch.float64)
    log_p0 = torch.log_softmax(logits, 1)
    r = torch.randn(P, K, generator=g, dtype=torch.float64)
    rare = log_p0.argmin(1)
    r[torch.arange(P), rare] = 3.0
    log_z = torch.logsumexp(log_p0 + r / beta, 1)
    log_star = log_p0 + r / beta - log_z[:, None]
    log_pi = torch.logaddexp(math.log(1 - alpha) + log_p0, math.log(alpha) + log_star)
    pi = log_pi.exp()
    kl_ref = (pi * (log_pi - log_p0)).sum(1)
    j = (pi * r).sum(1) - beta * kl_ref
    kl_star = (pi * (log_pi - log_star)).sum(1)
    return log_p0, log_pi, r, log_z, j, kl_star


def draw(log_q, n, g):
    return torch.multinomial(log_q.exp(), n, replacement=True, generator=g)


def estimate(seed, beta, n0, m, alpha=0.5, true_max=True):
    log_p0, log_pi, r, log_z, j, kl_star = bandit(seed, beta, alpha)
    g = torch.Generator().manual_seed(10_000 + seed)
    x0, xp = draw(log_p0, n0, g), draw(log_pi, m, g)
    gather = lambda t, x: t.gather(1, x)  # noqa: E731
    d = log_pi - log_p0
    r0, rp = gather(r, x0), gather(r, xp)
    r_max = float(r.max()) if true_max else float(torch.cat([r0, rp], 1).max())
    est = core.posterior_kl_bounds(r0, gather(d, x0), rp, gather(d, xp), beta, r_max)
    truth = {"log_z": float(log_z.mean()), "j": float(j.mean()), "kl": float(kl_star.mean())}
    return est, truth


def test_mixture_estimate_is_unbiased_and_the_plain_one_without_policy_samples():
    log_p0, log_pi, r, log_z, *_ = bandit(0, 0.5, 0.5)
    d = log_pi - log_p0
    g = torch.Generator().manual_seed(1)
    zs = []
    for _ in range(400):
        x0, xp = draw(log_p0, 4, g), draw(log_pi, 4, g)
        zs.append(
            core.mixture_log_z(
                r.gather(1, x0), d.gather(1, x0), r.gather(1, xp), d.gather(1, xp), 0.5
            ).exp()
        )
    z_hat = torch.stack(zs).mean(0)  # E[Ẑ] = Z prompt by prompt
    torch.testing.assert_close(z_hat.log(), log_z, atol=0.08, rtol=0)
    x0 = draw(log_p0, 8, g)
    plain = torch.logsumexp(r.gather(1, x0) / 0.5, 1) - math.log(8)
    empty = torch.zeros(P, 0, dtype=torch.float64)
    torch.testing.assert_close(
        core.mixture_log_z(r.gather(1, x0), d.gather(1, x0), empty, empty, 0.5), plain
    )


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize(("n0", "m"), [(8, 4), (64, 8)])
def test_intervals_cover_the_exact_log_z_and_posterior_kl(beta, n0, m):
    """Over 40 seeds each: the log Z interval covers the exact mean log Z, the KL interval the
    exact mean KL(π‖π*), in ≥ 90% of seeds (each side is a 95% bound); the KL estimate is never
    negative and its interval never inverted."""
    cover_z = cover_kl = 0
    for seed in range(40):
        est, truth = estimate(seed, beta, n0, m)
        cover_z += est["log_z_low"] <= truth["log_z"] <= est["log_z_high"]
        cover_kl += est["posterior_kl_low"] <= truth["kl"] <= est["posterior_kl_high"]
        assert 0 <= est["posterior_kl_low"] <= est["posterior_kl"] <= est["posterior_kl_high"]
    assert cover_z >= 36 and cover_kl >= 36, (cover_z, cover_kl)


def test_policy_samples_find_the_tail_that_pi0_misses():
    """At small β, Z is the rare high-reward response's: 8 π₀ samples seldom draw it, a policy
    near π* does, and the mixture estimate is far nearer the truth than π₀'s alone."""
    errs_plain, errs_mix = [], []
    for seed in range(20):
        log_p0, log_pi, r, log_z, *_ = bandit(seed, 0.1, 0.9)
        g = torch.Generator().manual_seed(seed)
        x0, xp = draw(log_p0, 8, g), draw(log_pi, 8, g)
        d = log_pi - log_p0
        empty = torch.zeros(P, 0, dtype=torch.float64)
        plain = core.mixture_log_z(r.gather(1, x0), d.gather(1, x0), empty, empty, 0.1)
        mix = core.mixture_log_z(
            r.gather(1, x0), d.gather(1, x0), r.gather(1, xp), d.gather(1, xp), 0.1
        )
        errs_plain.append(float((log_z - plain).mean()))
        errs_mix.append(float((log_z - mix).abs().mean()))
    assert np.mean(errs_plain) > 5 * np.mean(errs_mix)
    assert np.mean(errs_mix) < 0.3
