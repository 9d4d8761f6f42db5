"""RL: KL-regularised fine-tuning of the SFT policy toward the normalised reward model (PPO, RLOO
or DPG), with the distance to the posterior π* = π₀·exp(r/β)/Z measured before and after.

Run by DVC (see dvc.yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmpipe import dist, stage
from lmpipe.chat import ChatTemplate, load_template
from lmpipe.checkpoints import checkpoint_store
from lmpipe.config import Params, RLParams, load_params
from lmpipe.data.sources import DataError
from lmpipe.gold import make_gold
from lmpipe.io import atomic_dir, write_history_csv, write_json
from lmpipe.model import context_length, load_model, read_manifest, save_model
from lmpipe.reward.model import RewardModel
from lmpipe.rl import report as R
from lmpipe.rl.loop import RLTrainer, fit
from lmpipe.rl.rollout import ValueModel
from lmpipe.scoring import ScoreFn
from lmpipe.tracking.report import model_card
from lmpipe.tracking.run import stage_run
from lmpipe.tracking.tracker import NullTracker

log = logging.getLogger("rl")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def fitting_prompts(
    path: Path, template: ChatTemplate, cfg: RLParams, context: int, limit: int
) -> tuple[list[str], list[list[int]]]:
    """(texts, token ids) of the first `limit` prompts of a JSONL that leave room for
    `rl.max_new_tokens` in the model's context."""
    texts, enc = [], []
    for r in read_jsonl(path):
        p = template.prompt_ids(r["prompt"])
        if len(p) + cfg.max_new_tokens <= context:
            texts.append(r["prompt"])
            enc.append(p)
    if not enc:
        raise DataError(
            f"no prompt fits model.context {context} with rl.max_new_tokens "
            f"{cfg.max_new_tokens}; lower rl.max_new_tokens"
        )
    return texts[:limit], enc[:limit]


def value_model(
    cfg: RLParams, rm: RewardModel, policy: torch.nn.Module, device: torch.device
) -> ValueModel | None:
    """PPO's critic: from the reward model or the policy's backbone (`rl.ppo.value_init`)."""
    if cfg.algo != "ppo":
        return None
    if cfg.ppo.value_init == "reward":
        return ValueModel.from_reward_model(rm.model, rm.gain, rm.bias).to(device)
    return ValueModel.zero_head(policy).to(device)


def frozen_models(
    args: argparse.Namespace, cfg: RLParams, device: torch.device
) -> tuple[torch.nn.Module, RewardModel]:
    """The reference (the SFT model) and the reward model, where `rl.reference_device` and
    `rl.reward_device` place them (auto: the policy's device)."""
    ref = load_model(args.sft, dist.place("rl.reference_device", cfg.reference_device, device))
    rm_device = dist.place("rl.reward_device", cfg.reward_device, device)
    return ref, RewardModel.load(args.reward, rm_device)


def scorers(
    rm: RewardModel, gold: Callable, template: ChatTemplate, train_text: list[str]
) -> tuple[ScoreFn, Callable]:
    """The RL reward (the reward model on prompt + response ids) and the gold scorer of the
    training prompts' responses (`RLTrainer`'s `gold_fn`)."""

    def score_fn(prompts, responses):
        return rm.score_ids([[*p, *r] for p, r in zip(prompts, responses, strict=True)])

    def gold_fn(prompt_index, responses):
        texts = [template.decode(r) for r in responses]
        return gold([train_text[i] for i in prompt_index], texts)

    return score_fn, gold_fn


def write_outputs(
    args: argparse.Namespace,
    params: Params,
    tracker: Any,
    policy: torch.nn.Module,
    report: dict,
    checkpoint_dir: str,
) -> None:
    """The policy with its manifest, logged (and registered) in MLflow; the report JSON."""
    with atomic_dir(args.out) as tmp:
        save_model(
            policy,
            tmp,
            args.data,
            stage.manifest("rl", params, tracker.tags, report, checkpoint_dir),
        )
    tracker.log_outputs({"model": args.out})
    if params.tracking.log_models:
        keys = ("gold_reward.final", "proxy_reward.final", "kl_to_ref", "posterior_kl")
        card = model_card(f"rl ({params.rl.algo})", report, keys)
        stage.log_model(tracker, args.out, "model", "policy", "lmpipe-rl-torch", card)
    tracker.log_report(report, "reports/rl.json")
    write_json(args.report, report)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--sft", type=Path, required=True, help="SFT model: init and reference")
    ap.add_argument("--reward", type=Path, required=True, help="reward model (models/reward)")
    ap.add_argument("--data", type=Path, required=True, help="prepared data (prompts)")
    ap.add_argument("--out", type=Path, required=True, help="model folder (models/rl)")
    ap.add_argument("--report", type=Path, required=True, help="metrics JSON")
    ap.add_argument("--plots", type=Path, required=True, help="per-step CSV")
    ap.add_argument("--cache", type=Path, default=Path(".cache/checkpoints"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    params = load_params(args.params, ["rl", "tracking"])
    cfg = params.rl
    info, device = dist.setup(cfg.device)
    inputs = {"sft": args.sft, "reward": args.reward, "data": args.data}
    # the gold scorer is the one that labelled the reward model's pairs (its lineage)
    pref = read_manifest(args.reward)["params"]["preference"]
    gold = make_gold(pref["gold"], keywords=pref.get("keywords", ()))

    run = stage_run("rl", params, params.tracking, inputs)
    with run if info.is_main else contextlib.nullcontext(NullTracker()) as tracker:
        template = load_template(args.data)
        policy = load_model(args.sft, device)
        ref, rm = frozen_models(args, cfg, device)
        prompts = args.data / "prompts"
        train_text, train_ids = fitting_prompts(
            prompts / "rl.jsonl", template, cfg, context_length(policy), 10**9
        )
        eval_text, eval_ids = fitting_prompts(
            prompts / "eval.jsonl", template, cfg, context_length(policy), cfg.eval_prompts
        )

        score_fn, gold_fn = scorers(rm, gold, template, train_text)
        trainer = RLTrainer(
            policy,
            ref,
            cfg,
            train_ids,
            score_fn,
            eos_id=template.stop_ids,
            pad_id=template.pad_id,
            seed=params.seed,
            value_model=value_model(cfg, rm, policy, device),
            gold_fn=gold_fn,
        )
        precision = "bf16" if trainer.bf16 else "fp32"
        tracker.set_tags({"rl/precision": precision})
        log.info("sampling, log-prob, value and update passes in %s (%s)", precision, cfg.precision)
        ev = R.EvalSet(
            eval_text,
            eval_ids,
            score_fn,
            template.decode,
            gold,
            dict(
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                eos_id=template.stop_ids,
                pad_id=template.pad_id,
                penalty=cfg.missing_eos_penalty,
            ),
        )
        # π₀ on the eval prompts: log Z (N per prompt) and the "init" row; rank 0's job
        if info.is_main:
            gen = torch.Generator(device=ref.device).manual_seed(params.seed + 1)
            init, best_of = R.evaluate_reference(ref, ev, cfg, gen)

        store = checkpoint_store(args.cache, "rl", stage.checkpoint_key(params, inputs))
        history, elapsed, gen_seconds = fit(trainer, store, tracker, info.is_main)
        if not info.is_main:  # the weights are rank 0's too: evaluation and outputs are its job
            dist.teardown()
            return
        write_history_csv(args.plots, history)
        final = R.evaluate_policy(policy, ref, ev, cfg, init, gen)
        done = R.Run(
            history,
            trainer.kl_ctl.beta,
            elapsed,
            gen_seconds,
            len(train_ids),
            info.world,
            precision,
        )
        report = R.rl_report(cfg, init, final, best_of, done)
        tracker.log_text(R.side_by_side(ev, init, final, cfg), "samples.txt")
        write_outputs(args, params, tracker, policy, report, store.directory.name)
        store.clear()
        log.info(
            "%s: gold %.3f → %.3f, proxy %.2f → %.2f, KL %.2f nats, KL(π‖π*) %.2f, %.1f episodes/s",
            cfg.algo,
            init.figures["gold"],
            final.figures["gold"],
            init.figures["proxy"],
            final.figures["proxy"],
            final.figures["kl"],
            final.figures["posterior_kl"],
            report["episodes_per_sec"],
        )

    dist.teardown()


if __name__ == "__main__":
    stage.run(main, "rl")
