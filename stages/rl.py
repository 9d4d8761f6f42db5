"""RL: KL-regularised fine-tuning of the SFT policy toward the normalised reward model (PPO, RLOO
or DPG), with the distance to the posterior π* = π₀·exp(r/β)/Z measured before and after.

Run by DVC (see dvc.yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from lmpipe import dist, stage
from lmpipe.chat import load_template
from lmpipe.config import load_params
from lmpipe.data.sources import DataError
from lmpipe.data.stats import distinct_ngram_ratio
from lmpipe.evaluate import metrics as M
from lmpipe.gold import make_gold
from lmpipe.io import atomic_dir, write_json
from lmpipe.model import context_length, load_model, read_manifest, save_model
from lmpipe.progress import Progress
from lmpipe.reward.metrics import cluster_se, sample_gold_order
from lmpipe.reward.model import RewardModel
from lmpipe.rl.loop import RLTrainer
from lmpipe.rl.posterior import draw, posterior_kl, rescore
from lmpipe.rl.rollout import ValueModel
from lmpipe.tracking import NullTracker, model_card, stage_run
from lmpipe.train import checkpoint_store, write_history_csv

log = logging.getLogger("rl")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--sft", type=Path, required=True, help="SFT model: init and reference")
    ap.add_argument("--reward", type=Path, required=True, help="reward model (models/reward)")
    ap.add_argument("--data", type=Path, required=True, help="prepared data (prompts)")
    ap.add_argument("--out", type=Path, required=True, help="model folder (models/rl)")
    ap.add_argument("--report", type=Path, required=True, help="metrics JSON")
    ap.add_argument("--plots", type=Path, required=True, help="per-step CSV")
    ap.add_argument("--cache", type=Path, default=Path(".cache/checkpoints"))
    args = ap.parse_args()

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
        policy, ref = load_model(args.sft, device), load_model(args.sft, device)
        rm = RewardModel.load(args.reward, device)
        context = context_length(policy)

        def encode(rows: list[dict], limit: int) -> tuple[list[str], list[list[int]]]:
            texts, enc = [], []
            for r in rows:
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

        train_text, train_ids = encode(read_jsonl(args.data / "prompts" / "rl.jsonl"), 10**9)
        eval_text, eval_ids = encode(
            read_jsonl(args.data / "prompts" / "eval.jsonl"), cfg.eval_prompts
        )

        def score_fn(prompts, responses):
            return rm.score_ids([[*p, *r] for p, r in zip(prompts, responses, strict=True)])

        def decode(resp: list[int]) -> str:  # the assistant text only
            return template.decode(resp)

        def gold_fn(prompt_index, responses):
            return gold([train_text[i] for i in prompt_index], [decode(r) for r in responses])

        value = None
        if cfg.algo == "ppo":
            value = (
                ValueModel.from_reward_model(rm.model, rm.gain, rm.bias)
                if cfg.value_init == "reward"
                else ValueModel.zero_head(policy)
            ).to(device)
        trainer = RLTrainer(
            policy, ref, cfg, train_ids, score_fn, eos_id=template.stop_ids,
            pad_id=template.pad_id,
            seed=params.seed, value_model=value, gold_fn=gold_fn,
        )  # fmt: skip
        precision = "bf16" if trainer.bf16 else "fp32"
        tracker.set_tags({"rl/precision": precision})
        log.info("sampling, log-prob, value and update passes in %s (%s)", precision, cfg.precision)
        sample_kw = dict(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            eos_id=template.stop_ids, pad_id=template.pad_id, penalty=cfg.missing_eos_penalty,
        )  # fmt: skip

        def summary(s, prompts_text):
            texts = [decode(r) for r in s.responses]
            g = gold([prompts_text[i] for i in s.prompt_index], texts)
            proxy = s.proxy[~np.isnan(s.proxy)]
            idx, gold_arr = np.asarray(s.prompt_index), np.asarray(g)
            rows = range(len(prompts_text))
            by_prompt = {  # per-prompt means: the unit of the gains' standard errors
                "gold": np.array([_nanmean(gold_arr[idx == i]) for i in rows]),
                "proxy": np.array([_nanmean(s.proxy[idx == i]) for i in rows]),
            }
            return texts, {
                "by_prompt": by_prompt,
                "gold_each": gold_arr,
                "gold": float(np.mean(g)),
                "proxy": float(np.mean(proxy)) if proxy.size else float("nan"),
                "score": float(np.mean(s.scores)),
                "kl": float(np.mean(s.kl)),
                "kl_k3": float(np.mean(s.kl_k3)),
                "entropy": float(np.mean(s.entropy)),
                "distinct_2": distinct_ngram_ratio(texts, 2),
                "eos_rate": float(np.mean(s.ended)),
            }

        # π₀ on the eval prompts: log Z (N per prompt) and the "init" row; rank 0's job
        if info.is_main:
            gen = torch.Generator(device=device).manual_seed(params.seed + 1)
            t0 = time.perf_counter()
            ref_s = draw(ref, ref, eval_ids, cfg.posterior_samples, score_fn, generator=gen,
                         **sample_kw)  # fmt: skip
            init_texts, init = summary(ref_s, eval_text)
            init.update(posterior_kl(ref_s, ref_s, cfg.kl_coef, len(eval_ids)))
            best_of = best_of_n_frontier(ref_s.scores, init["gold_each"], len(eval_ids),
                                         cfg.kl_coef)  # fmt: skip
            n_post, n_eval = cfg.posterior_samples, cfg.eval_samples
            init["distinct_2"] = distinct_ngram_ratio(
                [t for i, t in enumerate(init_texts) if i % n_post < n_eval], 2
            )
            eval_seconds = time.perf_counter() - t0

        store = checkpoint_store(args.cache, "rl", stage.checkpoint_key(params, inputs))
        state = store.load()
        history, elapsed, gen_seconds = [], 0.0, 0.0
        if state is not None:
            trainer.load_state_dict(state["trainer"])
            history, elapsed, gen_seconds = state["history"], state["elapsed"], state["gen"]
            log.warning("resuming from checkpoint at step %d (%s)", trainer.step, store.path)
        bar = Progress(cfg.steps, f"rl ({cfg.algo}) step", initial=trainer.step,
                       enabled=info.is_main)  # fmt: skip
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
            if info.is_main and (trainer.step % 10 == 0 or trainer.step == cfg.steps):
                log.info(
                    "step %d/%d: score %.3f, gold %.3f, KL %.2f (k3 %.2f), beta %.3f, "
                    "EOS %.2f, %.1f episodes/s",
                    trainer.step, cfg.steps, m["rl/score"], m.get("rl/gold", float("nan")),
                    m["rl/kl"], m["rl/kl_k3"], m["rl/beta"], m["rl/eos_frac"],
                    m["rl/episodes_per_sec"],
                )  # fmt: skip
            if info.is_main and cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
                store.save(
                    {"trainer": trainer.state_dict(), "history": history, "elapsed": elapsed,
                     "gen": gen_seconds}
                )  # fmt: skip
        bar.close()
        if not info.is_main:  # the weights are rank 0's too: evaluation and outputs are its job
            dist.teardown()
            return
        write_history_csv(args.plots, history)

        t0 = time.perf_counter()
        pol_s = draw(policy, ref, eval_ids, cfg.eval_samples, score_fn, generator=gen,
                     **sample_kw)  # fmt: skip
        final_texts, final = summary(pol_s, eval_text)
        pol_of_ref = rescore(policy, eval_ids, ref_s, temperature=cfg.temperature,
                             pad_id=template.pad_id)  # fmt: skip
        final.update(posterior_kl(ref_s, pol_s, cfg.kl_coef, len(eval_ids), pol_of_ref))
        eval_seconds += time.perf_counter() - t0
        # the reward model on SFT's and on the policy's own samples; as many π₀ samples a
        # prompt as the policy has, so that both count pairs alike
        first = np.arange(len(ref_s.scores)) % cfg.posterior_samples < cfg.eval_samples
        reward_order = {
            "sft": sample_gold_order(ref_s.proxy[first], init["gold_each"][first],
                                     np.asarray(ref_s.prompt_index)[first]),
            "policy": sample_gold_order(pol_s.proxy, final["gold_each"], pol_s.prompt_index),
        }  # fmt: skip
        episodes = cfg.steps * min(cfg.prompts_per_step, len(train_ids)) * cfg.samples_per_prompt
        batch_kl = [h["rl/kl"] for h in history]
        report = {
            "algo": cfg.algo,
            "world_size": info.world,
            "precision": precision,
            "beta": cfg.kl_coef,
            "beta_final": trainer.kl_ctl.beta,
            "gold_reward": {"init": init["gold"], "final": final["gold"]},
            **gain_with_se("gold", init["by_prompt"]["gold"], final["by_prompt"]["gold"]),
            **gain_with_se("proxy", init["by_prompt"]["proxy"], final["by_prompt"]["proxy"]),
            "proxy_reward": {"init": init["proxy"], "final": final["proxy"]},
            "kl_to_ref": final["kl"],
            "kl_to_ref_k3": final["kl_k3"],
            "posterior_kl": final["posterior_kl"],
            "posterior_kl_interval": [final["posterior_kl_low"], final["posterior_kl_high"]],
            "posterior_kl_init": init["posterior_kl"],
            "log_z": final["log_z"],
            "log_z_interval": [final["log_z_low"], final["log_z_high"]],
            "log_z_samples_per_prompt": {"ref": cfg.posterior_samples, "policy": cfg.eval_samples},
            "reward_max": final["reward_max"],
            "objective_j": {"init": init["objective_j"], "final": final["objective_j"]},
            "objective_j_se": final["objective_j_se"],
            "reward_gold_order": reward_order,
            "best_of_n": best_of,
            "entropy": final["entropy"],
            "entropy_init": init["entropy"],
            "distinct_2": final["distinct_2"],
            "distinct_2_init": init["distinct_2"],
            "eos_rate": {"init": init["eos_rate"], "final": final["eos_rate"]},
            "min_batch_kl": float(min(batch_kl)) if batch_kl else float("nan"),
            "j_slope_ratio": j_slope_ratio(history),
            "episodes_per_sec": episodes / max(elapsed, 1e-9),
            "generate_share": gen_seconds / max(elapsed, 1e-9),
            "train_seconds": elapsed,
            "eval_seconds": eval_seconds,
            "eval_prompts": len(eval_ids),
            "steps": cfg.steps,
            "episodes": episodes,
        }
        tracker.log_text(
            "\n\n".join(
                f"PROMPT: {eval_text[i // cfg.eval_samples]}\nRL: {t}\n"
                f"SFT: {init_texts[(i // cfg.eval_samples) * cfg.posterior_samples]}"
                for i, t in enumerate(final_texts)
                if i % cfg.eval_samples == 0
            ),
            "samples.txt",
        )
        with atomic_dir(args.out) as tmp:
            save_model(
                policy, tmp, args.data,
                stage.manifest("rl", params, tracker.tags, report, store.directory.name),
            )  # fmt: skip
        tracker.log_outputs({"model": args.out})
        if params.tracking.log_models:
            keys = ("gold_reward.final", "proxy_reward.final", "kl_to_ref", "posterior_kl")
            card = model_card(f"rl ({cfg.algo})", report, keys)
            stage.log_model(tracker, args.out, "model", "policy", "lmpipe-rl-torch", card)
        tracker.log_report(report, "reports/rl.json")
        write_json(args.report, report)
        store.clear()
        log.info(
            "%s: gold %.3f → %.3f, proxy %.2f → %.2f, KL %.2f nats, KL(π‖π*) %.2f, %.1f episodes/s",
            cfg.algo, init["gold"], final["gold"], init["proxy"], final["proxy"], final["kl"],
            final["posterior_kl"], report["episodes_per_sec"],
        )  # fmt: skip

    dist.teardown()


def best_of_n_frontier(
    scores: np.ndarray, gold: np.ndarray, n_prompts: int, beta: float
) -> list[dict[str, float]]:
    """Best-of-n from π₀ on the eval prompts, ranked by the RL reward, from the π₀ samples the
    log Z estimate drew: RL reward, gold, KL bound and J ≥ reward − β·bound for each n, the
    frontier a converged policy should reach at its KL."""
    select = np.asarray(scores, np.float64).reshape(n_prompts, -1)
    out = []
    for n in (1, 2, 4, 8, 16, 32):
        if n > select.shape[1]:
            break
        got = M.best_of_n(select, {"gold": np.asarray(gold).reshape(n_prompts, -1)}, n)
        bound = M.best_of_n_kl_bound(n)
        out.append({"n": n, "kl_bound": bound, "score": got["select"], "gold": got["gold"],
                    "objective_j_lower": got["select"] - beta * bound})  # fmt: skip
    return out


def j_slope_ratio(history: list[dict], tail: float = 0.2) -> float:
    """How fast the training batches' J = score − β·KL still rises over the last `tail` of the
    steps, as a share of its mean rise over the run (least-squares slopes): near 0 or below
    once the run has converged, near 1 or above where the budget stopped it."""
    steps = np.array([h["step"] for h in history], dtype=float)
    j = np.array([h["rl/score"] - h["rl/beta"] * h["rl/kl"] for h in history])
    last = steps > steps.max() * (1 - tail) if len(steps) else steps.astype(bool)
    if last.sum() < 3 or len(steps) < 5:
        return float("nan")
    overall = np.polyfit(steps, j, 1)[0]
    return float(np.polyfit(steps[last], j[last], 1)[0] / overall) if overall > 0 else float("nan")


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def gain_with_se(name: str, init: np.ndarray, final: np.ndarray) -> dict[str, float]:
    """`<name>_gain` from π₀ to the policy on the same eval prompts, and its standard error
    from the per-prompt differences (prompts where either side has no value left out)."""
    d = np.asarray(final, np.float64) - np.asarray(init, np.float64)
    d = d[np.isfinite(d)]
    se = cluster_se(d, np.arange(d.size))  # one difference per prompt: s/√n
    return {f"{name}_gain": float(d.mean()) if d.size else float("nan"), f"{name}_gain_se": se}


if __name__ == "__main__":
    stage.run(main, "rl")
