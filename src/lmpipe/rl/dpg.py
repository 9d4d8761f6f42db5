"""DPG toward the posterior p(x) = π₀(x)·exp(r(x)/β)/Z, sampling from a proposal q (GDC++:
Khalifa et al. 2021; Korbak et al. 2022 for the baseline).

    target      log P = Σ_t log π₀(y_t | ·) + r/β   (β is p's temperature, not a penalty)
    Z           per prompt, a running mean of P/q over every visit (unbiased under any q)
    weights     A = P/q − Z·π/q   (`core.dpg_weights`)
    update      one step on −mean(A · Σ_t log π(y_t | ·))
    proposal    every `swap_every` steps q ← π when KL(p‖π) < KL(p‖q) over those steps

The batch is q's: the step's score, KL and entropy are the policy's, estimated from q's samples
weighted by π/q (`policy_view`).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch

from lmpipe.config import RLParams
from lmpipe.rl import core
from lmpipe.rl.learner import Learner, Rollout, Update, all_sum, all_sum_


class DPG:
    """Importance-weighted maximum likelihood toward p, with a proposal that catches up."""

    sampler_logprobs = True  # the rollout's log-probs are q's

    def __init__(self, learner: Learner, cfg: RLParams, n_prompts: int) -> None:
        self.learner, self.cfg = learner, cfg
        self.proposal = copy.deepcopy(learner.policy).eval().requires_grad_(False)
        self.sampler = self.proposal
        self.z_log_sum = torch.full((n_prompts,), -math.inf, dtype=torch.float64)  # running Z
        self.z_count = torch.zeros(n_prompts, dtype=torch.float64)
        self.swap_window: list[tuple[float, float]] = []
        self.swaps = 0

    def row_order(self, b: int) -> torch.Tensor:
        return torch.arange(b)

    def step(self, ro: Rollout, beta: float) -> Update:
        k = self.cfg.samples_per_prompt
        log_q = (ro.logp * ro.mask).sum(-1).double().view(-1, k).cpu()
        log_p = self.target(ro, beta)
        logp, ent = self.learner.policy_logprobs(ro)
        pi_tokens = all_sum_(logp.detach().clone())
        log_pi = (pi_tokens * ro.mask).sum(-1).double().view(-1, k).cpu()
        log_z = self.update_z(ro, log_p - log_q)
        weights = core.dpg_weights(log_p, log_q, log_pi, log_z).view(-1).float()
        metrics = self.update(ro, logp, weights)
        est = core.dpg_estimates(log_p, log_q, log_pi, log_z)
        w = torch.softmax(log_p - log_q, dim=1)  # effective sample size of P/q per prompt
        ess = float((1.0 / (w**2).sum(1)).mean()) / k
        swapped = self.maybe_swap(float(est.kl_p_pi.mean()), float(est.kl_p_q.mean()))
        view = self.policy_view(ro, pi_tokens, ent, log_pi.view(-1) - log_q.view(-1))
        kl_q = float((core.kl_k1(ro.logp, ro.ref_logp) * ro.mask).sum(-1).mean())  # q's own
        return Update(
            {
                "rl/kl_q": kl_q,
                **metrics,
                "rl/kl_p_pi": float(est.kl_p_pi.mean()),
                "rl/kl_p_q": float(est.kl_p_q.mean()),
                "rl/tvd_p_pi": float(est.tvd_p_pi.mean()),
                "rl/log_z": float(log_z.mean()),
                "rl/proposal_swaps": float(self.swaps),
                "rl/swapped": swapped,
                "rl/ess_frac": ess,
            },
            policy_view=view,
        )

    def target(self, ro: Rollout, beta: float) -> torch.Tensor:
        """(P, k) log P = Σ log π₀ + r/β, in float64."""
        k = self.cfg.samples_per_prompt
        log_p = (ro.ref_logp * ro.mask).sum(-1).double().cpu() + ro.scores.double().cpu() / beta
        return log_p.view(-1, k)

    def update_z(self, ro: Rollout, log_w: torch.Tensor) -> torch.Tensor:
        """Fold this batch's P/q (`log_w`, (P, k)) into each prompt's running Ẑ; (P,) log Ẑ."""
        k = self.cfg.samples_per_prompt
        idx = ro.prompt_index.view(-1, k)[:, 0]
        self.z_log_sum[idx] = torch.logaddexp(self.z_log_sum[idx], torch.logsumexp(log_w, 1))
        self.z_count[idx] += k
        return self.z_log_sum[idx] - torch.log(self.z_count[idx])

    def update(self, ro: Rollout, logp: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
        """One step on −mean(A·Σ log π); `logp` carries the graph of this rank's rows."""
        seq_logp = (logp * ro.mask).sum(-1)
        loss = -(weights.to(self.learner.device) * seq_logp).sum() / len(weights)
        loss.backward()
        grad_norm = self.learner.clip_and_step()[0]
        return {"rl/policy_loss": all_sum(float(loss.detach())), "rl/grad_norm": grad_norm}

    def maybe_swap(self, kl_p_pi: float, kl_p_q: float) -> float:
        """q ← π when π was nearer p than q over the last `swap_every` steps; 1.0 if swapped."""
        self.swap_window.append((kl_p_pi, kl_p_q))
        if len(self.swap_window) < self.cfg.dpg.swap_every:
            return 0.0
        pi_kl, q_kl = np.mean(self.swap_window, axis=0)
        self.swap_window = []
        if pi_kl < q_kl:
            self.proposal.load_state_dict(self.learner.policy.state_dict())
            self.swaps += 1
            return 1.0
        return 0.0

    def policy_view(
        self, ro: Rollout, logp: torch.Tensor, ent: torch.Tensor, log_w: torch.Tensor
    ) -> dict[str, float]:
        """Score, proxy, KL to the reference (k1, k3) and entropy of the policy π, from the
        proposal q's samples weighted by π/q (self-normalised over the batch): what DPG logs
        and adapts β on, where the batch's own figures would describe q (its KL: `rl/kl_q`)."""
        w = torch.softmax(log_w, 0).to(self.learner.device, torch.float32)  # (B,) Σ = 1
        mask = ro.mask
        k1 = (core.kl_k1(logp, ro.ref_logp) * mask).sum(-1)
        k3 = (core.kl_k3(logp, ro.ref_logp) * mask).sum(-1)
        tokens = mask.sum(-1).clamp(min=1)
        proxy = ro.proxy.to(self.learner.device)
        seen = ~torch.isnan(proxy)
        return {
            "rl/score": float((w * ro.scores).sum()),
            "rl/proxy": float((w[seen] * proxy[seen]).sum() / w[seen].sum().clamp(min=1e-30)),
            "rl/kl": float((w * k1).sum()),
            "rl/kl_k3": float((w * k3).sum()),
            "rl/entropy": float((w * (ent * mask).sum(-1)).sum() / (w * tokens).sum()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "proposal": self.proposal.state_dict(),
            "z_log_sum": self.z_log_sum,
            "z_count": self.z_count,
            "swap_window": self.swap_window,
            "swaps": self.swaps,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.proposal.load_state_dict(s["proposal"])
        self.z_log_sum, self.z_count = s["z_log_sum"], s["z_count"]
        self.swap_window, self.swaps = [tuple(x) for x in s["swap_window"]], s["swaps"]
