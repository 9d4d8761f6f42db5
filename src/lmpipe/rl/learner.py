"""What PPO, RLOO and DPG share: the rollout batch they update on, what an update returns, and
the learner (policy, optional critic, optimiser, precision, and the split of passes across ranks).

Under torchrun each rank samples its share of the prompt groups and every rank then holds the
whole rollout (`RLTrainer.rollout`) and the same weights; the passes are split by prompt groups
and their results (and gradients) summed across ranks, so every rank takes the step one process
would. With `rl.sharding: fsdp` the update's passes run through FSDP2 copies of the policy and
critic (`lmpipe.shard`), each rank holding 1/N of their weights, gradients and AdamW state, and
after each step the whole weights are gathered into the plain models, which sample, run the
rollout's passes and are saved.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from lmpipe import shard
from lmpipe.config import ParamsError, RLParams
from lmpipe.dist import rank_world
from lmpipe.logprobs import response_logprobs
from lmpipe.precision import use_bf16
from lmpipe.rl.rollout import ValueModel, disable_dropout
from lmpipe.sampling import Generation


@dataclass
class Rollout:
    """One batch of samples, scored, with the log-prob passes its algorithm asked for."""

    gen: Generation
    prompt_index: torch.Tensor  # (B,) into the trainer's prompt list, prompt-major (P, k)
    scores: torch.Tensor  # (B,) reward-model score, or the missing-EOS penalty
    proxy: torch.Tensor  # (B,) reward-model score (NaN where the response has no EOS)
    logp: torch.Tensor | None  # (B, R) the sampler's log-probs (policy; q for dpg); rloo: None
    ref_logp: torch.Tensor  # (B, R)
    entropy: torch.Tensor | None  # (B, R) the sampler's entropies; rloo: None
    values: torch.Tensor | None  # (B, R) ppo only
    chunks: list[torch.Tensor]  # row chunks every pass used (epoch 0 minibatches for ppo)
    gold: np.ndarray | None
    seconds_generate: float
    step: int  # the trainer step that drew it

    @property
    def mask(self) -> torch.Tensor:
        return self.gen.response_mask


@dataclass
class Update:
    """What an algorithm's update computed, for the step's metrics."""

    metrics: dict[str, float]  # its own figures, logged as they are
    logp: torch.Tensor | None = None  # (B, R) on-policy log-probs where the rollout had none
    entropy: torch.Tensor | None = None  # (B, R) likewise
    # score, proxy, kl, kl_k3 and entropy of the policy where the batch describes another
    # model (dpg's samples are q's); None: the batch's own means
    policy_view: dict[str, float] | None = field(default=None)


def split_rows(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(torch.split(order, size))


def all_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` across ranks in place (each rank filled its own rows, zeros elsewhere)."""
    if rank_world()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


def all_sum(x: float) -> float:
    if rank_world()[1] == 1:
        return x
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return float(all_sum_(torch.tensor([x], dtype=torch.float64, device=device)).item())


def all_mean(x: float) -> float:
    """The ranks' mean of a per-rank statistic (each over its share of the minibatches)."""
    return all_sum(x) / rank_world()[1]


class PolicyPass(torch.nn.Module):
    """The policy's log-prob pass as a module's forward, so that FSDP's root hooks gather the
    embeddings and head that `response_logprobs` reads directly. `sharded`: the root of an FSDP
    twin, whose output must not be a view."""

    def __init__(self, model: torch.nn.Module, temperature: float, sharded: bool = False) -> None:
        super().__init__()
        self.model, self.temperature, self.sharded = model, temperature, sharded

    def forward(
        self, gen: Generation, rows: torch.Tensor, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        lp, e = response_logprobs(self.model, gen, rows, self.temperature, with_entropy)
        return (lp.clone() if self.sharded else lp), e  # FSDP hooks its output: not a view


class ValuePass(torch.nn.Module):
    """The critic's pass as a module's forward; `sharded`: the root of an FSDP twin, whose
    output must not be a view."""

    def __init__(self, model: ValueModel, sharded: bool = False) -> None:
        super().__init__()
        self.model, self.sharded = model, sharded

    def forward(self, gen: Generation, rows: torch.Tensor) -> torch.Tensor:
        v = self.model(gen, rows)
        return v.clone() if self.sharded else v  # FSDP hooks its output: not a view


class Learner:
    """The trained models and their optimiser: the policy, PPO's critic, AdamW over both, the
    precision of every pass, and this rank's share of the rows."""

    def __init__(self, policy: torch.nn.Module, value: ValueModel | None, cfg: RLParams) -> None:
        self.cfg = cfg
        self.policy = disable_dropout(policy).train()
        self.value = value.train() if value is not None else None
        self.device = next(policy.parameters()).device
        self.rank, self.world = rank_world()
        # every pass that yields log-probs, values or gradients runs in one precision, so the
        # first minibatch still reproduces the rollout's log-probs exactly (ratio 1, KL 0)
        self.bf16 = use_bf16(cfg.precision, self.device)
        self.sharded = shard.enabled(cfg.sharding)
        # the update's passes: sharded copies (fp32 weights under autocast, as the plain
        # models' rollout passes, so the first minibatch still reproduces them) or the models
        self.policy_net: torch.nn.Module = PolicyPass(self.policy, cfg.temperature)
        self.value_net = ValuePass(self.value) if self.value is not None else None
        if self.sharded:
            policy_pass = partial(PolicyPass, temperature=cfg.temperature, sharded=True)
            self.policy_net = shard.twin(self.policy, policy_pass)
            shard.sum_gradients(self.policy_net)
            if self.value is not None:
                self.value_net = shard.twin(self.value, partial(ValuePass, sharded=True))
                shard.sum_gradients(self.value_net)
        nets = [n for n in (self.policy_net, self.value_net) if n is not None]
        self.trained = torch.nn.ModuleList([n.model for n in nets])  # the optimizer's, by name
        kw = dict(lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adam_eps, weight_decay=0.0)
        # one group per model, each with its peak rate: the loop scales both by the schedule
        params = [{"params": list(n.model.parameters()), "peak_lr": cfg.lr} for n in nets]
        if self.value_net is not None and cfg.ppo.critic_lr is not None:
            params[1]["peak_lr"] = cfg.ppo.critic_lr
        try:
            self.opt = torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(params, foreach=True, **kw)

    def amp(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around the sampler and the log-prob, value and update passes when
        `precision` asks; the logits are cast back to fp32 before any softmax (the sampler's,
        `head_logprobs`). Sampling in the passes' precision keeps the distribution drawn from
        the one whose log-probs they compute, and it is the faster one where bf16 is chosen
        (`python bench/rl_passes.py`)."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def mine(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of `rows`: whole prompt groups (k rows each, kept together so a
        pass runs each prompt once), dealt round-robin."""
        if self.world == 1:
            return rows
        k = self.cfg.samples_per_prompt
        if self.sharded and (len(rows) % k or len(rows) // k % self.world):
            raise ParamsError(
                f"rl.sharding 'fsdp' runs every pass on every rank in step: each minibatch "
                f"needs a multiple of {self.world} prompt groups (here {len(rows) / k:g}); "
                "make rl.minibatch_size and rl.prompts_per_step × rl.samples_per_prompt "
                f"multiples of {self.world} × rl.samples_per_prompt"
            )
        if len(rows) % k:  # a minibatch that cuts a prompt group: single rows
            return rows[self.rank :: self.world]
        return rows.view(-1, k)[self.rank :: self.world].reshape(-1)

    def policy_logprobs(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log π with grad (one graph over this rank's rows, zero elsewhere) and the
        entropies of every row (summed across ranks)."""
        logp = torch.zeros(ro.mask.shape, device=self.device)
        ent = torch.zeros(ro.mask.shape, device=self.device)
        for whole in ro.chunks:
            r = self.mine(whole)
            if not len(r):
                continue
            with self.amp():
                lp, e = self.policy_net(ro.gen, r, True)
            logp = logp.index_put((r,), lp)
            ent[r] = e
        return logp, all_sum_(ent)

    def _sync_grads(self) -> None:
        """Sum the ranks' gradients (each rank's loss is its share of the whole minibatch's),
        so every rank takes the step one process would."""
        if self.world == 1:
            return
        if self.sharded:  # FSDP reduce-scattered the sharded ones in the backward
            for net in (self.policy_net, self.value_net):
                if net is not None:
                    shard.sync_whole_grads(net, average=False)
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

    def clip_and_step(self) -> tuple[float, float]:
        """Clip the policy's and the critic's gradients each to `grad_clip`, then step: one
        joint norm let the critic's larger gradient shrink the policy's step. Returns both
        norms before clipping (the critic's NaN without one)."""
        self._sync_grads()
        norms = []
        for module in (self.policy_net, self.value_net):
            params = [p for p in module.parameters() if p.grad is not None] if module else []
            if not params or not self.cfg.grad_clip:
                norms.append(float("nan"))
                continue
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sharded:  # the plain models sample, score the rollout and are saved
            shard.copy_back(self.policy_net, self.policy, "model.")
            if self.value is not None:
                shard.copy_back(self.value_net, self.value, "model.")
        return norms[0], norms[1]

    def optimizer_state(self) -> dict:
        """AdamW's state for a checkpoint (collective with `rl.sharding: fsdp`: every rank
        calls it, rank 0 gets the whole state, keyed by parameter name)."""
        return shard.optimizer_state(self.trained, self.opt, self.cfg.sharding == "fsdp")

    def load_optimizer_state(self, state: dict) -> None:
        """AdamW's state from a checkpoint, after the plain models' weights were loaded: the
        sharded copies take those weights first."""
        if self.sharded:
            shard.load_model_state(self.policy_net.model, self.policy.state_dict(), True)
            if self.value is not None:
                shard.load_model_state(self.value_net.model, self.value.state_dict(), True)
        shard.load_optimizer_state(self.trained, self.opt, state, self.cfg.sharding == "fsdp")
