"""RLOO: REINFORCE with a leave-one-out baseline over k samples a prompt (Ahmadian et al. 2024).

    log-probs   log π(y_t | ·) with grad: one on-policy update, so these are the rollout's too
    penalty     R_i = score_i − β·Σ_t k1_t
    advantages  A_i = R_i − (Σ_j R_j − R_i)/(k − 1)
    update      one step on −mean(A_i · Σ_t log π(y_t | ·))

The rollout runs only the reference's pass: the policy's log-probs come from the pass with
grad here, and the update returns them (detached) for the step's KL and entropy.
"""

from __future__ import annotations

from typing import Any

import torch

from lmpipe.config import RLParams
from lmpipe.rl import core
from lmpipe.rl.learner import Learner, Rollout, Update, all_sum, all_sum_


class RLOO:
    """One on-policy REINFORCE step a rollout, baseline from the prompt's other samples."""

    sampler_logprobs = False  # its single update computes them with grad

    def __init__(self, learner: Learner, cfg: RLParams) -> None:
        self.learner, self.cfg = learner, cfg
        self.sampler = learner.policy

    def row_order(self, b: int) -> torch.Tensor:
        return torch.arange(b)

    def step(self, ro: Rollout, beta: float) -> Update:
        logp, ent = self.learner.policy_logprobs(ro)
        old = all_sum_(logp.detach().clone())  # on-policy: the rollout's log-probs too
        rewards = self.penalty(ro, old, beta)
        adv = self.advantages(rewards)
        return Update(self.update(ro, logp, adv), logp=old, entropy=ent)

    def penalty(self, ro: Rollout, logp: torch.Tensor, beta: float) -> torch.Tensor:
        """(B,) R = score − β·Σ_t k1_t."""
        kl = (core.kl_k1(logp, ro.ref_logp) * ro.mask).sum(-1)
        return ro.scores - beta * kl

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(B,) R minus the mean of the prompt's other k − 1 rewards."""
        k = self.cfg.samples_per_prompt
        return core.rloo_advantages(rewards.view(-1, k)).view(-1)

    def update(self, ro: Rollout, logp: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
        """One step on −mean(A·Σ log π); `logp` carries the graph of this rank's rows."""
        seq_logp = (logp * ro.mask).sum(-1)
        # the batch mean, as a sum over this rank's rows (zero elsewhere) over the whole batch
        loss = -(adv.detach() * seq_logp).sum() / len(adv)
        loss.backward()
        grad_norm = self.learner.clip_and_step()[0]
        return {"rl/policy_loss": all_sum(float(loss.detach())), "rl/grad_norm": grad_norm}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        pass
