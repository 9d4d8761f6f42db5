"""PPO for language models (Ziegler et al. 2019; the "N implementation details" reproduction).

    penalty     r_t = −β·k1_t on every response token, plus the score on the last one
    advantages  GAE(γ, λ) with the critic's values; returns = A + V; A whitened
    update      `epochs` passes over fresh prompt-group permutations, in minibatches:
                clipped surrogate max(−A·ρ, −A·clip(ρ, 1 ± ε)) + vf_coef · clipped value loss

The rollout samples from the policy and runs the old policy's, the reference's and the critic's
passes over the minibatches of the first epoch, so that its first minibatch reproduces them
bit for bit (ratio 1, KL 0: `first_minibatch`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmpipe.config import RLParams
from lmpipe.rl import core
from lmpipe.rl.learner import Learner, Rollout, Update, all_mean, all_sum, split_rows

TOKEN_STATS = (
    "approx_kl",
    "clipfrac",
    "ratio_mean",
    "ratio_var",
    "policy_loss",
    "value_loss",
    "value_clipfrac",
)
"""PPO's per-minibatch statistics that are token means (summed across ranks by share)."""


class PPO:
    """Clipped-surrogate policy and value updates on a rollout of the policy itself."""

    sampler_logprobs = True  # the rollout's log-probs are the old policy's

    def __init__(self, learner: Learner, cfg: RLParams, seed: int) -> None:
        if learner.value is None:
            raise ValueError("ppo needs a value model")
        self.learner, self.cfg = learner, cfg
        self.sampler = learner.policy
        self.perm_gen = torch.Generator().manual_seed(seed)  # minibatch permutations
        self.first_minibatch: dict[str, torch.Tensor] = {}

    def row_order(self, b: int) -> torch.Tensor:
        """PPO's minibatch order: the batch's prompts shuffled, each prompt's k rows kept
        together, so that a minibatch runs each of its prompts once (`response_states`)."""
        k = self.cfg.samples_per_prompt
        groups = torch.randperm(b // k, generator=self.perm_gen)
        return (groups[:, None] * k + torch.arange(k)).flatten()

    def step(self, ro: Rollout, beta: float) -> Update:
        k1, rewards = self.penalty(ro, beta)
        adv, returns = self.advantages(ro, rewards)
        return Update(self.update(ro, k1, adv, returns))

    def penalty(self, ro: Rollout, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(k1, per-token rewards), each (B, R): r_t = −β·k1_t, the score added at the last
        response token (`core.token_rewards`); whitened without mean shift if asked."""
        mask = ro.mask
        k1 = core.kl_k1(ro.logp, ro.ref_logp) * mask
        rewards = core.token_rewards(ro.scores, k1, mask, beta)
        if self.cfg.ppo.whiten_rewards:
            rewards = core.whiten(rewards, mask, shift_mean=False)
        return k1, rewards

    def advantages(self, ro: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, returns), each (B, R): GAE over the critic's values, then whitened."""
        p = self.cfg.ppo
        adv, returns = core.gae(rewards, ro.values, ro.mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = core.whiten(adv, ro.mask)
        return adv, returns

    def update(
        self, ro: Rollout, k1: torch.Tensor, adv: torch.Tensor, returns: torch.Tensor
    ) -> dict[str, float]:
        """`ppo.epochs` passes of minibatch steps; the epoch means of their statistics."""
        cfg, p, mask = self.cfg, self.cfg.ppo, ro.mask
        critic_only = ro.step < p.critic_warmup_steps
        stats: dict[str, list[float]] = {}
        b = mask.shape[0]
        for epoch in range(p.epochs):
            chunks = ro.chunks if epoch == 0 else split_rows(self.row_order(b), cfg.minibatch_size)
            for i, whole in enumerate(chunks):
                got = self._minibatch(ro, whole, k1, adv, returns, critic_only, epoch == i == 0)
                for key, val in got.items():
                    stats.setdefault(key, []).append(val)
        # token-weighted shares summed over ranks: the whole minibatch's means (ratio_var, a
        # variance, only approximately); the norms are the same on every rank
        out = {
            f"rl/{k}": all_sum(float(np.mean(v)))
            if k in TOKEN_STATS
            else all_mean(float(np.mean(v)))
            for k, v in stats.items()
        }
        out["rl/explained_variance"] = core.explained_variance(ro.values, returns, mask)
        return out

    def _minibatch(
        self,
        ro: Rollout,
        whole: torch.Tensor,
        k1: torch.Tensor,
        adv: torch.Tensor,
        returns: torch.Tensor,
        critic_only: bool,
        first: bool,
    ) -> dict[str, float]:
        """One optimiser step on this rank's rows of the minibatch `whole`; its statistics."""
        learner, p, mask = self.learner, self.cfg.ppo, ro.mask
        rows = learner.mine(whole)
        if not len(rows):  # more ranks than prompt groups here: a zero gradient
            norms = learner.clip_and_step()
            return {
                **dict.fromkeys(TOKEN_STATS, 0.0),
                "grad_norm": norms[0],
                "value_grad_norm": norms[1],
            }
        with learner.amp():
            logp, _ = learner.policy_net(ro.gen, rows, False)
            v = learner.value_net(ro.gen, rows)
        pl = core.ppo_policy_loss(logp, ro.logp[rows], adv[rows], mask[rows], p.clip)
        vl, vclip = core.ppo_value_loss(v, ro.values[rows], returns[rows], mask[rows], p.value_clip)
        if first:
            self.first_minibatch = {
                "ratio": torch.exp(logp.detach() - ro.logp[rows])[mask[rows]],
                "k1": k1[rows][mask[rows]],
            }
        loss = p.vf_coef * vl if critic_only else pl.loss + p.vf_coef * vl
        # token means over this rank's rows, weighted to their share of the minibatch
        share = mask[rows].sum() / mask[whole].sum()
        (loss * share).backward()
        grad_norm, value_grad_norm = learner.clip_and_step()
        out = {
            key: float(val.detach() * share)
            for key, val in (
                ("approx_kl", pl.approx_kl),
                ("clipfrac", pl.clipfrac),
                ("ratio_mean", pl.ratio_mean),
                ("ratio_var", pl.ratio_var),
                ("policy_loss", pl.loss),
                ("value_loss", vl),
                ("value_clipfrac", vclip),
            )
        }
        return {**out, "grad_norm": grad_norm, "value_grad_norm": value_grad_norm}

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.learner.value.state_dict(), "perm_gen": self.perm_gen.get_state()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.learner.value.load_state_dict(s["value"])
        self.perm_gen.set_state(s["perm_gen"])
