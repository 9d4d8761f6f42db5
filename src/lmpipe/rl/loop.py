"""The RL loop: rollout with the shared sampler, then a PPO, RLOO or DPG update.

One `RLTrainer` serves the three algorithms; only `_update_*` differs. Models, scorer and
prompts come in as objects (no files, no params parsing here), so the same loop runs the real
stage and the toy problems of the tests, where π* is known exactly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmpipe.config import RLParams
from lmpipe.logprobs import response_logprobs
from lmpipe.precision import use_bf16
from lmpipe.rl import core
from lmpipe.rl.rollout import ValueModel, disable_dropout
from lmpipe.sampling import Generation, generate
from lmpipe.scoring import ScoreFn, score_generation


@dataclass
class Rollout:
    gen: Generation
    prompt_index: torch.Tensor  # (B,) into the trainer's prompt list, prompt-major (P, k)
    scores: torch.Tensor  # (B,) reward-model score, or the missing-EOS penalty
    proxy: torch.Tensor  # (B,) reward-model score (NaN where the response has no EOS)
    logp: torch.Tensor  # (B, R) log-probs of the sampling model (policy; proposal for dpg)
    ref_logp: torch.Tensor  # (B, R)
    entropy: torch.Tensor  # (B, R)
    values: torch.Tensor | None  # (B, R) ppo only
    chunks: list[torch.Tensor]  # row chunks every pass used (epoch 0 minibatches for ppo)
    gold: np.ndarray | None
    seconds_generate: float

    @property
    def mask(self) -> torch.Tensor:
        return self.gen.response_mask


def split_rows(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(torch.split(order, size))


TOKEN_STATS = ("approx_kl", "clipfrac", "ratio_mean", "ratio_var", "policy_loss", "value_loss",
               "value_clipfrac")  # fmt: skip
"""PPO's per-minibatch statistics that are token means (summed across ranks by share)."""


def world_info() -> tuple[int, int]:
    """(rank, world size) of the process group torchrun set up, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` across ranks in place (each rank filled its own rows, zeros elsewhere)."""
    if world_info()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


def all_sum(x: float) -> float:
    if world_info()[1] == 1:
        return x
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return float(all_sum_(torch.tensor([x], dtype=torch.float64, device=device)).item())


def all_mean(x: float) -> float:
    """The ranks' mean of a per-rank statistic (each over its share of the minibatches)."""
    return all_sum(x) / world_info()[1]


class RLTrainer:
    """Holds policy, reference, critic or proposal, optimiser, β controller and RNG state."""

    def __init__(
        self,
        policy: torch.nn.Module,
        ref: torch.nn.Module,
        cfg: RLParams,
        prompts: Sequence[Sequence[int]],
        score_fn: ScoreFn,
        *,
        eos_id: int | Sequence[int],
        pad_id: int,
        seed: int,
        value_model: ValueModel | None = None,
        gold_fn: Callable[[Sequence[int], Sequence[Sequence[int]]], np.ndarray] | None = None,
    ) -> None:
        if cfg.algo == "ppo" and value_model is None:
            raise ValueError("ppo needs a value model")
        self.cfg, self.prompts, self.score_fn, self.gold_fn = cfg, list(prompts), score_fn, gold_fn
        self.policy = disable_dropout(policy).train()
        self.ref = disable_dropout(ref).eval().requires_grad_(False)
        self.value = value_model.train() if (cfg.algo == "ppo" and value_model) else None
        self.proposal = (
            copy.deepcopy(policy).eval().requires_grad_(False) if cfg.algo == "dpg" else None
        )
        self.eos_id, self.pad_id = eos_id, pad_id
        self.device = next(policy.parameters()).device
        # under torchrun every rank holds the whole rollout and the same weights; the passes
        # are split by prompt groups and their results (and gradients) summed across ranks
        self.rank, self.world = world_info()
        # every pass that yields log-probs, values or gradients runs in one precision, so the
        # first minibatch still reproduces the rollout's log-probs exactly (ratio 1, KL 0)
        self.bf16 = use_bf16(cfg.precision, self.device)
        params = list(self.policy.parameters())
        if self.value is not None:
            params += list(self.value.parameters())
        kw = dict(lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adam_eps, weight_decay=0.0)
        try:
            self.opt = torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(params, foreach=True, **kw)
        self.kl_ctl = core.AdaptiveKL(
            cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon
        )
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.perm_gen = torch.Generator().manual_seed(seed)  # minibatch permutations
        self.order_rng = np.random.default_rng(seed)
        self.order: list[int] = []
        self.pos = 0
        self.step = 0
        n = len(self.prompts)
        self.z_log_sum = torch.full((n,), -math.inf, dtype=torch.float64)  # dpg running Z
        self.z_count = torch.zeros(n, dtype=torch.float64)
        self.swap_window: list[tuple[float, float]] = []
        self.swaps = 0
        self.first_minibatch: dict[str, torch.Tensor] = {}

    def amp(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around the sampler and the log-prob, value and update passes when
        `precision` asks; the logits are cast back to fp32 before any softmax (the sampler's,
        `head_logprobs`). Sampling in the passes' precision keeps the distribution drawn from
        the one whose log-probs they compute, and it is the faster one where bf16 is chosen
        (`python bench/rl_passes.py`)."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ----------------------------------------------------------------------- rollout

    def _next_prompts(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.pos >= len(self.order):
                self.order = self.order_rng.permutation(len(self.prompts)).tolist()
                self.pos = 0
            k = min(n - len(out), len(self.order) - self.pos)
            out.extend(self.order[self.pos : self.pos + k])
            self.pos += k
        return out

    @torch.no_grad()
    def rollout(self) -> Rollout:
        cfg = self.cfg
        picked = self._next_prompts(min(cfg.prompts_per_step, len(self.prompts)))
        index = torch.tensor([i for i in picked for _ in range(cfg.samples_per_prompt)])
        prompts = [self.prompts[i] for i in index.tolist()]
        sampler = self.proposal if self.proposal is not None else self.policy
        t0 = time.perf_counter()
        with self.amp():  # sample from the distribution the log-prob passes compute
            gen = generate(
                sampler, prompts, max_new_tokens=cfg.max_new_tokens, eos_id=self.eos_id,
                pad_id=self.pad_id, temperature=cfg.temperature, generator=self.generator,
            )  # fmt: skip
        seconds_generate = time.perf_counter() - t0
        scores, proxy = score_generation(gen, prompts, self.score_fn, cfg.missing_eos_penalty)
        b = len(prompts)
        order = self._shuffled_rows(b) if cfg.algo == "ppo" else torch.arange(b)
        chunks = split_rows(order, cfg.minibatch_size)
        shape = gen.response.shape
        logp, ref_logp, ent = (torch.zeros(shape, device=self.device) for _ in range(3))
        values = torch.zeros(shape, device=self.device) if self.value is not None else None
        was_training = sampler.training
        sampler.eval()
        with self.amp():
            for j, rows in enumerate(chunks):
                if j % self.world != self.rank:  # another rank's chunk: summed in below
                    continue
                if cfg.algo != "rloo":  # rloo's single on-policy update computes them with grad
                    lp, e = response_logprobs(sampler, gen, rows, cfg.temperature)
                    logp[rows], ent[rows] = lp, e
                ref_logp[rows] = response_logprobs(self.ref, gen, rows, cfg.temperature, False)[0]
                if values is not None:
                    values[rows] = self.value(gen, rows)
        sampler.train(was_training)
        for t in (logp, ent, ref_logp, values):
            if t is not None:
                all_sum_(t)
        gold = None
        if self.gold_fn is not None:
            lengths = gen.lengths.tolist()
            resp = gen.response.cpu()
            gold = self.gold_fn(index.tolist(), [resp[i, : lengths[i]].tolist() for i in range(b)])
        return Rollout(
            gen, index, scores.to(self.device), proxy, logp, ref_logp, ent, values, chunks,
            gold, seconds_generate,
        )  # fmt: skip

    def _shuffled_rows(self, b: int) -> torch.Tensor:
        """PPO's minibatch order: the batch's prompts shuffled, each prompt's k rows kept
        together, so that a minibatch runs each of its prompts once (`response_states`)."""
        k = self.cfg.samples_per_prompt
        groups = torch.randperm(b // k, generator=self.perm_gen)
        return (groups[:, None] * k + torch.arange(k)).flatten()

    # ----------------------------------------------------------------------- updates

    def _mine(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of `rows`: whole prompt groups (k rows each, kept together so a
        pass runs each prompt once), dealt round-robin."""
        if self.world == 1:
            return rows
        k = self.cfg.samples_per_prompt
        if len(rows) % k:  # a minibatch that cuts a prompt group: single rows
            return rows[self.rank :: self.world]
        return rows.view(-1, k)[self.rank :: self.world].reshape(-1)

    def _sync_grads(self) -> None:
        """Sum the ranks' gradients (each rank's loss is its share of the whole minibatch's),
        so every rank takes the step one process would."""
        if self.world == 1:
            return
        params = [p for g in self.opt.param_groups for p in g["params"] if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def _clip_and_step(self) -> tuple[float, float]:
        """Clip the policy's and the critic's gradients each to `grad_clip`, then step: one
        joint norm let the critic's larger gradient shrink the policy's step. Returns both
        norms before clipping (the critic's NaN without one)."""
        self._sync_grads()
        norms = []
        for module in (self.policy, self.value):
            params = [p for p in module.parameters() if p.grad is not None] if module else []
            if not params or not self.cfg.grad_clip:
                norms.append(float("nan"))
                continue
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norms[0], norms[1]

    def _update_ppo(self, ro: Rollout) -> dict[str, float]:
        cfg, mask = self.cfg, ro.mask
        beta = self.kl_ctl.beta
        k1 = core.kl_k1(ro.logp, ro.ref_logp) * mask
        rewards = core.token_rewards(ro.scores, k1, mask, beta)
        if cfg.whiten_rewards:
            rewards = core.whiten(rewards, mask, shift_mean=False)
        adv, returns = core.gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = core.whiten(adv, mask)
        critic_only = self.step < cfg.critic_warmup_steps
        stats: dict[str, list[float]] = {}
        b = mask.shape[0]
        for epoch in range(cfg.ppo_epochs):
            chunks = (
                ro.chunks if epoch == 0 else split_rows(self._shuffled_rows(b), cfg.minibatch_size)
            )
            for i, whole in enumerate(chunks):
                rows = self._mine(whole)
                if not len(rows):  # more ranks than prompt groups here: a zero gradient
                    norms = self._clip_and_step()
                    for key in TOKEN_STATS:
                        stats.setdefault(key, []).append(0.0)
                    for key, val in zip(("grad_norm", "value_grad_norm"), norms, strict=True):
                        stats.setdefault(key, []).append(val)
                    continue
                with self.amp():
                    logp, _ = response_logprobs(self.policy, ro.gen, rows, cfg.temperature, False)
                    v = self.value(ro.gen, rows)
                pl = core.ppo_policy_loss(logp, ro.logp[rows], adv[rows], mask[rows], cfg.clip)
                vl, vclip = core.ppo_value_loss(
                    v, ro.values[rows], returns[rows], mask[rows], cfg.value_clip
                )
                if epoch == 0 and i == 0:
                    self.first_minibatch = {
                        "ratio": torch.exp(logp.detach() - ro.logp[rows])[mask[rows]],
                        "k1": k1[rows][mask[rows]],
                    }
                loss = cfg.vf_coef * vl if critic_only else pl.loss + cfg.vf_coef * vl
                # token means over this rank's rows, weighted to their share of the minibatch
                share = mask[rows].sum() / mask[whole].sum()
                (loss * share).backward()
                grad_norm, value_grad_norm = self._clip_and_step()
                for key, val in (
                    ("approx_kl", pl.approx_kl), ("clipfrac", pl.clipfrac),
                    ("ratio_mean", pl.ratio_mean), ("ratio_var", pl.ratio_var),
                    ("policy_loss", pl.loss), ("value_loss", vl), ("value_clipfrac", vclip),
                ):  # fmt: skip
                    stats.setdefault(key, []).append(float(val.detach() * share))
                stats.setdefault("grad_norm", []).append(grad_norm)
                stats.setdefault("value_grad_norm", []).append(value_grad_norm)
        # token-weighted shares summed over ranks: the whole minibatch's means (ratio_var, a
        # variance, only approximately); the norms are the same on every rank
        out = {f"rl/{k}": all_sum(float(np.mean(v))) if k in TOKEN_STATS
               else all_mean(float(np.mean(v))) for k, v in stats.items()}  # fmt: skip
        out["rl/explained_variance"] = core.explained_variance(ro.values, returns, mask)
        return out

    def _policy_seq_logprobs(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log π with grad (one graph over this rank's rows, zero elsewhere) and the
        entropies of every row (summed across ranks)."""
        logp = torch.zeros(ro.mask.shape, device=self.device)
        ent = torch.zeros(ro.mask.shape, device=self.device)
        for whole in ro.chunks:
            r = self._mine(whole)
            if not len(r):
                continue
            with self.amp():
                lp, e = response_logprobs(self.policy, ro.gen, r, self.cfg.temperature)
            logp = logp.index_put((r,), lp)
            ent[r] = e
        return logp, all_sum_(ent)

    def _update_rloo(self, ro: Rollout) -> dict[str, float]:
        k = self.cfg.samples_per_prompt
        logp, ro.entropy = self._policy_seq_logprobs(ro)
        ro.logp = all_sum_(logp.detach().clone())  # on-policy: the rollout log-probs too
        seq_logp = (logp * ro.mask).sum(-1)
        kl = (core.kl_k1(ro.logp, ro.ref_logp) * ro.mask).sum(-1)
        rewards = ro.scores - self.kl_ctl.beta * kl
        adv = core.rloo_advantages(rewards.view(-1, k)).view(-1)
        # the batch mean, as a sum over this rank's rows (zero elsewhere) over the whole batch
        loss = -(adv.detach() * seq_logp).sum() / len(adv)
        loss.backward()
        grad_norm = self._clip_and_step()[0]
        return {"rl/policy_loss": all_sum(float(loss.detach())), "rl/grad_norm": grad_norm}

    def _update_dpg(self, ro: Rollout) -> dict[str, float]:
        cfg, k = self.cfg, self.cfg.samples_per_prompt
        beta = self.kl_ctl.beta
        log_q = (ro.logp * ro.mask).sum(-1).double().view(-1, k).cpu()
        log_p = (ro.ref_logp * ro.mask).sum(-1).double().cpu() + ro.scores.double().cpu() / beta
        log_p = log_p.view(-1, k)
        logp, ent = self._policy_seq_logprobs(ro)
        seq_logp = (logp * ro.mask).sum(-1)
        pi_tokens = all_sum_(logp.detach().clone())
        log_pi = (pi_tokens * ro.mask).sum(-1).double().view(-1, k).cpu()
        # running per-prompt Ẑ: the mean of P/q over every visit (unbiased under any q)
        idx = ro.prompt_index.view(-1, k)[:, 0]
        log_w = log_p - log_q
        self.z_log_sum[idx] = torch.logaddexp(self.z_log_sum[idx], torch.logsumexp(log_w, 1))
        self.z_count[idx] += k
        log_z = self.z_log_sum[idx] - torch.log(self.z_count[idx])
        weights = core.dpg_weights(log_p, log_q, log_pi, log_z).view(-1).float()
        loss = -(weights.to(self.device) * seq_logp).sum() / len(weights)  # rows of this rank
        loss.backward()
        grad_norm = self._clip_and_step()[0]
        est = core.dpg_estimates(log_p, log_q, log_pi, log_z)
        w = torch.softmax(log_w, dim=1)  # effective sample size of P/q per prompt, as a share
        ess = float((1.0 / (w**2).sum(1)).mean()) / k
        self.swap_window.append((float(est.kl_p_pi.mean()), float(est.kl_p_q.mean())))
        swapped = 0.0
        if len(self.swap_window) >= cfg.dpg_swap_every:
            pi_kl, q_kl = np.mean(self.swap_window, axis=0)
            if pi_kl < q_kl:
                self.proposal.load_state_dict(self.policy.state_dict())
                self.swaps += 1
                swapped = 1.0
            self.swap_window = []
        return {
            **self._on_policy(ro, pi_tokens, ent, log_pi.view(-1) - log_q.view(-1)),
            "rl/policy_loss": all_sum(float(loss.detach())), "rl/grad_norm": grad_norm,
            "rl/kl_p_pi": float(est.kl_p_pi.mean()), "rl/kl_p_q": float(est.kl_p_q.mean()),
            "rl/tvd_p_pi": float(est.tvd_p_pi.mean()), "rl/log_z": float(log_z.mean()),
            "rl/proposal_swaps": float(self.swaps), "rl/swapped": swapped, "rl/ess_frac": ess,
        }  # fmt: skip

    def _on_policy(
        self, ro: Rollout, logp: torch.Tensor, ent: torch.Tensor, log_w: torch.Tensor
    ) -> dict[str, float]:
        """Score, proxy, KL to the reference (k1, k3) and entropy of the policy π, from the
        proposal q's samples weighted by π/q (self-normalised over the batch): what DPG logs
        and adapts β on, where the batch's own figures would describe q (`rl/kl_q`)."""
        w = torch.softmax(log_w, 0).to(self.device, torch.float32)  # (B,) Σ = 1
        mask = ro.mask
        k1 = (core.kl_k1(logp, ro.ref_logp) * mask).sum(-1)
        k3 = (core.kl_k3(logp, ro.ref_logp) * mask).sum(-1)
        tokens = mask.sum(-1).clamp(min=1)
        proxy = ro.proxy.to(self.device)
        seen = ~torch.isnan(proxy)
        return {
            "rl/score": float((w * ro.scores).sum()),
            "rl/proxy": float((w[seen] * proxy[seen]).sum() / w[seen].sum().clamp(min=1e-30)),
            "rl/kl": float((w * k1).sum()),
            "rl/kl_k3": float((w * k3).sum()),
            "rl/entropy": float((w * (ent * mask).sum(-1)).sum() / (w * tokens).sum()),
            "rl/kl_q": float((core.kl_k1(ro.logp, ro.ref_logp) * mask).sum(-1).mean()),
        }

    # ----------------------------------------------------------------------- one step

    def lr(self) -> float:
        if self.cfg.lr_schedule == "constant":
            return self.cfg.lr
        return self.cfg.lr * max(0.0, 1.0 - self.step / self.cfg.steps)

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        lr = self.lr()
        for g in self.opt.param_groups:
            g["lr"] = lr
        ro = self.rollout()
        update = {"ppo": self._update_ppo, "rloo": self._update_rloo, "dpg": self._update_dpg}
        metrics = update[self.cfg.algo](ro)
        mask = ro.mask
        k1 = (core.kl_k1(ro.logp, ro.ref_logp) * mask).sum(-1)
        k3 = (core.kl_k3(ro.logp, ro.ref_logp) * mask).sum(-1)
        beta = self.kl_ctl.beta
        # dpg's own figures are the policy's (`_on_policy`), not those of q that sampled
        kl = metrics.pop("rl/kl", float(k1.mean()))
        self.kl_ctl.update(kl, len(k1))
        dt = time.perf_counter() - t0
        proxy = ro.proxy[~torch.isnan(ro.proxy)]
        metrics.update(
            {
                "rl/score": metrics.pop("rl/score", float(ro.scores.mean())),
                "rl/proxy": metrics.pop(
                    "rl/proxy", float(proxy.mean()) if len(proxy) else float("nan")
                ),
                "rl/kl": kl,
                "rl/kl_k3": metrics.pop("rl/kl_k3", float(k3.mean())),
                "rl/non_score_reward": -beta * kl,
                "rl/beta": beta,
                "rl/lr": lr,
                "rl/entropy": metrics.pop("rl/entropy", float(core.masked_mean(ro.entropy, mask))),
                "rl/response_len": float(mask.sum(-1).float().mean()),
                "rl/eos_frac": float(ro.gen.ended.float().mean()),
                "rl/episodes_per_sec": len(k1) / dt,
                "rl/generate_share": ro.seconds_generate / dt,
            }
        )
        if ro.gold is not None:
            metrics["rl/gold"] = float(np.mean(ro.gold))
        self.step += 1
        return metrics

    # ----------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "value": self.value.state_dict() if self.value is not None else None,
            "proposal": self.proposal.state_dict() if self.proposal is not None else None,
            "optimizer": self.opt.state_dict(),
            "beta": self.kl_ctl.beta,
            "generator": self.generator.get_state(),
            "perm_gen": self.perm_gen.get_state(),
            "order_rng": self.order_rng.bit_generator.state,
            "order": self.order,
            "pos": self.pos,
            "step": self.step,
            "z_log_sum": self.z_log_sum,
            "z_count": self.z_count,
            "swap_window": self.swap_window,
            "swaps": self.swaps,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.policy.load_state_dict(s["policy"])
        if self.value is not None:
            self.value.load_state_dict(s["value"])
        if self.proposal is not None:
            self.proposal.load_state_dict(s["proposal"])
        self.opt.load_state_dict(s["optimizer"])
        self.kl_ctl.beta = s["beta"]
        self.generator.set_state(s["generator"])
        self.perm_gen.set_state(s["perm_gen"])
        self.order_rng.bit_generator.state = s["order_rng"]
        self.order, self.pos, self.step = list(s["order"]), s["pos"], s["step"]
        self.z_log_sum, self.z_count = s["z_log_sum"], s["z_count"]
        self.swap_window, self.swaps = [tuple(x) for x in s["swap_window"]], s["swaps"]
