"""The RL loop: one step is rollout → score → penalty → advantages → update.

`RLTrainer` samples a batch of k responses per prompt, scores them, and runs the log-prob
passes the algorithm asks for (`rollout`); the algorithm (`lmpipe.rl.ppo`, `.rloo`, `.dpg`)
turns the batch into a penalised reward, advantages and an update, and returns what it
computed; the trainer logs it and adapts β. Models, scorer and prompts come in as objects (no
files, no params parsing here), so the same loop runs the real stage and the toy problems of
the tests, where π* is known exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lmpipe.config import RLParams
from lmpipe.dist import gather_shards, shard
from lmpipe.logprobs import response_logprobs
from lmpipe.optim import rl_lr_at
from lmpipe.progress import Progress
from lmpipe.rl import core
from lmpipe.rl.dpg import DPG
from lmpipe.rl.learner import Learner, Rollout, Update, all_sum_, split_rows
from lmpipe.rl.ppo import PPO
from lmpipe.rl.rloo import RLOO
from lmpipe.rl.rollout import ValueModel, disable_dropout
from lmpipe.sampling import Generation, generate, pack
from lmpipe.scoring import ScoreFn, score_generation
from lmpipe.streams import stream_keys

log = logging.getLogger("rl")


class RLTrainer:
    """Holds the learner (policy, critic, optimiser), the reference, the algorithm, the β
    controller and the RNG state of prompt order (sampling draws from per-row streams keyed by
    the seed and the step)."""

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
        self.cfg, self.prompts, self.score_fn, self.gold_fn = cfg, list(prompts), score_fn, gold_fn
        self.learner = Learner(policy, value_model if cfg.algo == "ppo" else None, cfg)
        self.ref = disable_dropout(ref).eval().requires_grad_(False)
        if cfg.algo == "ppo":
            self.algo: PPO | RLOO | DPG = PPO(self.learner, cfg, seed)
        elif cfg.algo == "rloo":
            self.algo = RLOO(self.learner, cfg)
        else:
            self.algo = DPG(self.learner, cfg, len(self.prompts))
        self.eos_id, self.pad_id = eos_id, pad_id
        self.device = self.learner.device
        self.kl_ctl = core.AdaptiveKL(
            cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon
        )
        self.seed = seed  # with the step, the prompt's position and the sample's: a row's stream
        self.order_rng = np.random.default_rng(seed)
        self.order: list[int] = []
        self.pos = 0
        self.step = 0

    @property
    def policy(self) -> torch.nn.Module:
        return self.learner.policy

    @property
    def value(self) -> ValueModel | None:
        return self.learner.value

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.learner.opt

    @property
    def bf16(self) -> bool:
        return self.learner.bf16

    # ----------------------------------------------------------------------- one step

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        lr = self.lr()
        for g in self.opt.param_groups:
            g["lr"] = lr * g["peak_lr"] / self.cfg.lr
        ro = self.rollout()  # sample, score, log-prob passes
        beta = self.kl_ctl.beta
        update = self.algo.step(ro, beta)  # penalty → advantages → update
        metrics = self.step_metrics(ro, update, beta, lr)
        self.kl_ctl.update(metrics["rl/kl"], len(ro.scores))
        dt = time.perf_counter() - t0
        metrics["rl/episodes_per_sec"] = len(ro.scores) / dt
        metrics["rl/generate_share"] = ro.seconds_generate / dt
        if ro.gold is not None:
            metrics["rl/gold"] = float(np.mean(ro.gold))
        self.step += 1
        return metrics

    def lr(self) -> float:
        return rl_lr_at(self.step, self.cfg)

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
        """k samples of the algorithm's sampler for each of the step's prompts, scored, with
        the sampler's (unless the algorithm computes them itself), the reference's and the
        critic's passes over the algorithm's row chunks."""
        cfg, k = self.cfg, self.cfg.samples_per_prompt
        picked = self._next_prompts(min(cfg.prompts_per_step, len(self.prompts)))
        index = torch.tensor([i for i in picked for _ in range(k)])
        gen, scores, proxy, gold, seconds_generate = self._sample(picked)
        chunks = split_rows(self.algo.row_order(len(index)), cfg.minibatch_size)
        logp, ent, ref_logp, values = self._passes(gen, self.algo.sampler, chunks)
        return Rollout(
            gen,
            index,
            scores.to(self.device),
            proxy,
            logp,
            ref_logp,
            ent,
            values,
            chunks,
            gold,
            seconds_generate,
            self.step,
        )

    def _sample(
        self, picked: list[int]
    ) -> tuple[Generation, torch.Tensor, torch.Tensor, np.ndarray | None, float]:
        """(samples, scores, proxy, gold, seconds sampling) of the step's prompts: each rank
        samples and scores its share of the prompt groups, each row on its own random stream
        (seed, step, the prompt's position in the step, the sample's index), and the ranks
        gather the rows in the batch's order, so every rank holds what one process draws."""
        cfg, k = self.cfg, self.cfg.samples_per_prompt
        mine, groups, seconds = shard(len(picked)), [], 0.0
        if mine:
            pos = torch.tensor(mine).repeat_interleave(k)
            prompts = [self.prompts[picked[p]] for p in pos.tolist()]
            keys = stream_keys(self.seed, self.step, pos, torch.arange(k).repeat(len(mine)))
            t0 = time.perf_counter()
            with self.learner.amp():  # sample from the distribution the log-prob passes compute
                gen = generate(
                    self.algo.sampler,
                    prompts,
                    max_new_tokens=cfg.max_new_tokens,
                    eos_id=self.eos_id,
                    pad_id=self.pad_id,
                    temperature=cfg.temperature,
                    row_keys=keys,
                )
            seconds = time.perf_counter() - t0
            scores, proxy = score_generation(gen, prompts, self.score_fn, cfg.missing_eos_penalty)
            lengths = gen.lengths.tolist()
            responses = [r[:n] for r, n in zip(gen.response.tolist(), lengths, strict=True)]
            gold = [None] * len(responses)
            if self.gold_fn is not None:
                gold = self.gold_fn([picked[p] for p in pos.tolist()], responses).tolist()
            columns = (responses, gen.ended.tolist(), scores.tolist(), proxy.tolist(), gold)
            rows = list(zip(*columns, strict=True))
            groups = [rows[g * k : (g + 1) * k] for g in range(len(mine))]
        rows = [row for group in gather_shards(groups, len(picked)) for row in group]
        responses, ended, scores, proxy, gold = zip(*rows, strict=True)
        prompts = [self.prompts[i] for i in picked for _ in range(k)]
        gen = pack(prompts, responses, ended, self.pad_id, self.device)
        gold = np.asarray(gold, dtype=np.float64) if self.gold_fn is not None else None
        return gen, torch.tensor(scores), torch.tensor(proxy), gold, seconds

    def _passes(
        self, gen: Generation, sampler: torch.nn.Module, chunks: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(sampler log-probs, its entropies, reference log-probs, values), each (B, R) or
        None where not asked for; each rank runs its chunks and the results are summed."""
        learner, t = self.learner, self.cfg.temperature
        shape = gen.response.shape
        own = self.algo.sampler_logprobs
        logp, ent = (torch.zeros(shape, device=self.device) if own else None for _ in range(2))
        ref_logp = torch.zeros(shape, device=self.device)
        values = torch.zeros(shape, device=self.device) if learner.value is not None else None
        was_training = sampler.training
        sampler.eval()
        with learner.amp():
            for j, rows in enumerate(chunks):
                if j % learner.world != learner.rank:  # another rank's chunk: summed in below
                    continue
                if own:
                    logp[rows], ent[rows] = response_logprobs(sampler, gen, rows, t)
                ref_logp[rows] = response_logprobs(self.ref, gen, rows, t, False)[0]
                if values is not None:
                    values[rows] = learner.value(gen, rows)
        sampler.train(was_training)
        for x in (logp, ent, ref_logp, values):
            if x is not None:
                all_sum_(x)
        return logp, ent, ref_logp, values

    # ----------------------------------------------------------------------- metrics

    def step_metrics(self, ro: Rollout, update: Update, beta: float, lr: float) -> dict[str, float]:
        """The algorithm's own figures, then the batch's: score, proxy, KL (k1 and k3) to the
        reference and entropy of the policy (dpg: its `policy_view`), β, lr, length, EOS."""
        mask = ro.mask
        logp = update.logp if update.logp is not None else ro.logp
        entropy = update.entropy if update.entropy is not None else ro.entropy
        k1 = (core.kl_k1(logp, ro.ref_logp) * mask).sum(-1)
        k3 = (core.kl_k3(logp, ro.ref_logp) * mask).sum(-1)
        proxy = ro.proxy[~torch.isnan(ro.proxy)]
        view = update.policy_view or {}
        kl = view.get("rl/kl", float(k1.mean()))
        return {
            **update.metrics,
            "rl/score": view.get("rl/score", float(ro.scores.mean())),
            "rl/proxy": view.get("rl/proxy", float(proxy.mean()) if len(proxy) else float("nan")),
            "rl/kl": kl,
            "rl/kl_k3": view.get("rl/kl_k3", float(k3.mean())),
            "rl/non_score_reward": -beta * kl,
            "rl/beta": beta,
            "rl/lr": lr,
            "rl/entropy": view.get("rl/entropy", float(core.masked_mean(entropy, mask))),
            "rl/response_len": float(mask.sum(-1).float().mean()),
            "rl/eos_frac": float(ro.gen.ended.float().mean()),
        }

    # ----------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.learner.optimizer_state(),
            "beta": self.kl_ctl.beta,
            "order_rng": self.order_rng.bit_generator.state,
            "order": self.order,
            "pos": self.pos,
            "step": self.step,
            **self.algo.state_dict(),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.policy.load_state_dict(s["policy"])
        self.algo.load_state_dict(s)
        self.learner.load_optimizer_state(s["optimizer"])
        self.kl_ctl.beta = s["beta"]
        self.order_rng.bit_generator.state = s["order_rng"]
        self.order, self.pos, self.step = list(s["order"]), s["pos"], s["step"]


def fit(trainer: RLTrainer, store: Any, tracker: Any, is_main: bool) -> tuple[list, float, float]:
    """Train to `rl.steps`, resuming from `store`'s checkpoint if it holds one, checkpointing
    every `rl.checkpoint_every` steps (rank 0): (logged metrics, seconds training, seconds of
    them generating)."""
    cfg = trainer.cfg
    state = store.load()
    history, elapsed, gen_seconds = [], 0.0, 0.0
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        history, elapsed, gen_seconds = state["history"], state["elapsed"], state["gen"]
        log.warning("resuming from checkpoint at step %d (%s)", trainer.step, store.path)
    bar = Progress(cfg.steps, f"rl ({cfg.algo}) step", initial=trainer.step, enabled=is_main)
    while trainer.step < cfg.steps:
        t0 = time.perf_counter()
        m = trainer.train_step()
        dt = time.perf_counter() - t0
        elapsed += dt
        gen_seconds += m["rl/generate_share"] * dt
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
            history.append({"step": trainer.step, **m})
            tracker.log_metrics(m, step=trainer.step)
        bar.update(1, score=f"{m['rl/score']:.2f}", kl=f"{m['rl/kl']:.2f}")
        if is_main and (trainer.step % 10 == 0 or trainer.step == cfg.steps):
            log.info(
                "step %d/%d: score %.3f, gold %.3f, KL %.2f (k3 %.2f), beta %.3f, "
                "EOS %.2f, %.1f episodes/s",
                trainer.step,
                cfg.steps,
                m["rl/score"],
                m.get("rl/gold", float("nan")),
                m["rl/kl"],
                m["rl/kl_k3"],
                m["rl/beta"],
                m["rl/eos_frac"],
                m["rl/episodes_per_sec"],
            )
        if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
            state = trainer.state_dict()  # every rank: a sharded optimizer is gathered
            if is_main:
                store.save(
                    {"trainer": state, "history": history, "elapsed": elapsed, "gen": gen_seconds}
                )
    bar.close()
    return history, elapsed, gen_seconds
