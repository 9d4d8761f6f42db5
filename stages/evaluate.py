"""Evaluate: one report card for every model the pipeline made (PyTorch folders and ONNX bundles).

Same held-out prompts, same sampling seed, same test text for each: perplexity; mean gold and
proxy score; KL to SFT on the model's own samples; distinct-1/2 and self-BLEU; response length and
EOS rate; generation speed; size on disk. Best-of-n from SFT is the reference RL must beat.
Writes reports/metrics.json, reports/samples.jsonl, reports/report.md and reports/figures/.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from lmpipe import dist, stage
from lmpipe.chat import load_template
from lmpipe.config import load_params
from lmpipe.data.stats import words
from lmpipe.data.tokenizer import read_tokens
from lmpipe.evaluate import metrics as M
from lmpipe.evaluate import report as R
from lmpipe.evaluate.engines import Engine, OnnxEngine, TorchEngine
from lmpipe.gold import make_gold
from lmpipe.io import atomic_dir, atomic_write, read_json, read_jsonl, write_json, write_jsonl
from lmpipe.model import read_manifest
from lmpipe.reward.model import RewardModel
from lmpipe.tracking import flatten_numeric, stage_run

log = logging.getLogger("evaluate")
CURVES = ("pretrain", "sft", "reward", "rl", "compress")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--models", type=Path, required=True, help="models/ (pretrain, sft, rl, ...)")
    ap.add_argument("--plots", type=Path, required=True, help="reports/plots (training curves)")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--headline", type=Path, required=True, help="reports/headline.json")
    ap.add_argument("--samples", type=Path, required=True)
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--figures", type=Path, required=True)
    args = ap.parse_args()

    params = load_params(args.params, ["evaluate", "tracking"])
    cfg = params.evaluate
    _, device = dist.setup(cfg.device)
    device = str(device)
    m = args.models
    torch_models = {"pretrain": m / "pretrain", "sft": m / "sft", "rl": m / "rl"}
    for variant in sorted(p.name for p in (m / "compressed").glob("*") if p.is_dir()):
        torch_models[variant] = m / "compressed" / variant
    missing = [str(p) for p in [*torch_models.values(), m / "reward"] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing models: {', '.join(missing)}; run `dvc repro` first")
    bundles = sorted(p for p in (m / "onnx").glob("*") if (p / "bundle.json").exists())
    inputs = {**torch_models, "reward": m / "reward",
              "onnx": m / "onnx", "data": args.data}  # fmt: skip
    pref = read_manifest(m / "reward")["params"]["preference"]
    gold_fn = make_gold(pref["gold"], keywords=pref.get("keywords", ()))
    rl_params = read_manifest(m / "rl")["params"]["rl"]
    penalty = rl_params.get("missing_eos_penalty", -1.0)
    beta = float(rl_params["kl_coef"])  # J = RL reward − β·KL, the objective RL maximises

    with stage_run("evaluate", params, params.tracking, inputs) as tracker:
        template = load_template(args.data)
        eos, pad = template.end_of_turn_id, template.pad_id
        rm = RewardModel.load(m / "reward", device)
        engines: list[Engine] = [TorchEngine(n, f, eos, pad, device, template.stop_ids)
                                 for n, f in torch_models.items()]  # fmt: skip
        for b in bundles:
            files = read_json(b / "bundle.json")["files"]
            for precision in ("fp32", "int8"):
                if files.get(precision) and (b / files[precision]).exists():
                    suffix = "" if precision == "fp32" else f"-{precision}"
                    engines.append(OnnxEngine(f"onnx-{b.name}{suffix}", b, precision))
        context = min(e.context for e in engines)
        rows = read_jsonl(args.data / "prompts" / "eval.jsonl")
        pairs = [(r["prompt"], template.prompt_ids(r["prompt"])) for r in rows]
        pairs = [(t, p) for t, p in pairs if len(p) + cfg.max_new_tokens <= context]
        pairs = pairs[: cfg.eval_prompts]
        if not pairs:
            raise ValueError(f"no eval prompt fits the context of {context} tokens with "
                             f"evaluate.max_new_tokens {cfg.max_new_tokens}; lower it")  # fmt: skip
        texts = [t for t, _ in pairs]
        prompts = [p for _, p in pairs]
        meta = read_json(args.data / "meta.json")
        test = np.asarray(read_tokens(args.data / "test.bin", meta["dtype"]), dtype=np.int64)
        win = min(context, cfg.ppl_context) if cfg.ppl_context else context
        starts = np.linspace(0, len(test) - win - 1, cfg.ppl_windows).astype(np.int64)
        windows = np.stack([test[s : s + win + 1] for s in starts])

        def decode(r: list[int]) -> str:  # the assistant text only
            return template.decode(r)

        def proxy_of(ps: list[list[int]], rs: list[list[int]], ended: np.ndarray) -> np.ndarray:
            out = np.full(len(rs), np.nan)
            rows_ = np.flatnonzero(ended)
            if len(rows_):
                out[rows_] = rm.score_ids([[*ps[i], *rs[i], eos] for i in rows_])
            return out

        sft = next(e for e in engines if e.name == "sft")
        n = cfg.samples_per_prompt
        rep_prompts = [p for p in prompts for _ in range(n)]
        rep_texts = [t for t in texts for _ in range(n)]
        variants: dict[str, dict] = {}
        samples_out: list[dict] = []
        dists: dict[str, dict[str, np.ndarray]] = {}
        by_model: dict[str, list[str]] = {}
        for e in engines:
            t0 = time.perf_counter()
            s = e.sample(prompts, n, cfg.max_new_tokens, params.seed)
            resp_texts = [decode(r) for r in s.responses]
            gold = np.asarray(gold_fn(rep_texts, resp_texts), dtype=float)
            proxy = proxy_of(rep_prompts, s.responses, s.ended)
            logp = e.response_logprobs(rep_prompts, s.responses, s.ended)
            ref = logp if e is sft else sft.response_logprobs(rep_prompts, s.responses, s.ended)
            nll, count = e.nll(windows)
            speed_b = e.speed(prompts[0], cfg.speed_batch, cfg.speed_new_tokens, cfg.speed_repeats)
            speed_1 = e.speed(prompts[0], 1, cfg.speed_new_tokens, cfg.speed_repeats)
            row = {
                "kind": e.kind,
                "ppl": float(np.exp(nll / count)),
                "gold_reward": float(gold.mean()),
                "gold_reward_se": float(gold.std(ddof=1) / np.sqrt(len(gold))),
                "proxy_reward": float(np.nanmean(proxy)) if np.isfinite(proxy).any() else None,
                "rl_score": float(np.where(s.ended, proxy, penalty).mean()),
                "kl_to_sft": float(np.mean(logp - ref)),
                "kl_to_sft_se": float(np.std(logp - ref, ddof=1) / np.sqrt(len(logp))),
                "objective_j": float(
                    np.where(s.ended, proxy, penalty).mean() - beta * np.mean(logp - ref)
                ),
                "distinct_1": M.distinct_ngram_ratio(resp_texts, 1),
                "distinct_2": M.distinct_ngram_ratio(resp_texts, 2),
                "self_bleu": M.self_bleu(resp_texts, cfg.self_bleu_texts),
                "response_tokens": float(np.mean([len(r) for r in s.responses])),
                "response_words": float(np.mean([len(words(t)) for t in resp_texts])),
                "eos_rate": float(s.ended.mean()),
                "tokens_per_sec": speed_b["tokens_per_sec"],
                "latency_ms_per_token": speed_1["ms_per_token"],
                "size_mb": e.size_mb,
                "eval_seconds": time.perf_counter() - t0,
            }
            variants[e.name] = row
            dists[e.name] = {"gold": gold, "proxy": proxy}
            by_model[e.name] = resp_texts
            for i, (r, t) in enumerate(zip(s.responses, resp_texts, strict=True)):
                samples_out.append({
                    "model": e.name, "prompt_index": i // n, "prompt": rep_texts[i],
                    "response": t, "tokens": len(r), "ended": bool(s.ended[i]),
                    "gold": float(gold[i]),
                    "proxy": None if np.isnan(proxy[i]) else float(proxy[i]),
                    "logp": float(logp[i]), "logp_sft": float(ref[i]),
                })  # fmt: skip
            log.info(
                "%-18s ppl %6.2f  gold %.3f  proxy %5.2f  KL %5.2f  d2 %.3f  EOS %.2f  "
                "%6.0f tok/s  %5.2f ms/tok  %6.2f MB  (%.0f s)",
                e.name, row["ppl"], row["gold_reward"], row["proxy_reward"] or np.nan,
                row["kl_to_sft"], row["distinct_2"], row["eos_rate"], row["tokens_per_sec"],
                row["latency_ms_per_token"], row["size_mb"], row["eval_seconds"],
            )  # fmt: skip

        # best-of-n from SFT, ranked by the proxy (the RL reward: penalty without EOS)
        t0 = time.perf_counter()
        big = max(cfg.best_of_n)
        s = sft.sample(prompts, big, cfg.max_new_tokens, params.seed + 1)
        rp = [p for p in prompts for _ in range(big)]
        rt = [t for t in texts for _ in range(big)]
        proxy = proxy_of(rp, s.responses, s.ended)
        gold = np.asarray(gold_fn(rt, [decode(r) for r in s.responses]), dtype=float)
        select = np.where(s.ended, proxy, penalty).reshape(len(prompts), big)  # the RL reward
        best = []
        for k in cfg.best_of_n:
            got = M.best_of_n(select, {"gold": gold.reshape(len(prompts), big),
                                       "proxy": select}, k)  # fmt: skip
            kl_bound = M.best_of_n_kl_bound(k)
            best.append({"n": k, "kl_bound": kl_bound, "gold": got["gold"], "proxy": got["proxy"],
                         "objective_j_lower": got["proxy"] - beta * kl_bound})  # fmt: skip
        log.info("best-of-n from SFT (%d samples per prompt, %.0f s): %s", big,
                 time.perf_counter() - t0,
                 ", ".join(f"n={b['n']} gold {b['gold']:.3f}" for b in best))  # fmt: skip

        curves = {name: R.read_curves(args.plots / f"{name}.csv") for name in CURVES}
        flags = M.flags(curves.get("rl", {}), variants) + M.alignment_flags(
            read_manifest(m / "reward")["metrics"], read_manifest(m / "rl")["metrics"],
            curves.get("reward", {}),
        )  # fmt: skip
        for f in flags:
            log.warning("flag: %s", f)
        report = {
            "variants": variants,
            "best_of_n": best,
            "flags": flags,
            "eval": {
                "prompts": len(prompts),
                "samples_per_prompt": n,
                "seed": params.seed,
                "max_new_tokens": cfg.max_new_tokens,
                "ppl_tokens": int(windows[:, 1:].size),
                "speed_batch": cfg.speed_batch,
                "speed_new_tokens": cfg.speed_new_tokens,
                "device": device,
            },
        }

        side = []
        shown = [k for k in ("sft", "rl", "onnx-rl-int8") if k in by_model]
        for i in range(min(cfg.side_by_side, len(prompts))):
            side.append({"prompt": texts[i],
                         "responses": {k: by_model[k][i * n] for k in shown}})  # fmt: skip
        with atomic_dir(args.figures) as fig_dir:
            R.figure_training_curves(curves, fig_dir / "training_curves.png")
            points = {k: {"gold_reward": variants[k]["gold_reward"],
                          "rl_score": variants[k]["rl_score"],
                          "kl_to_sft": variants[k]["kl_to_sft"]}
                      for k in ("sft", "rl", "distilled", "pruned") if k in variants}  # fmt: skip
            R.figure_overoptimisation(curves.get("rl", {}), best, points,
                                      fig_dir / "overoptimisation.png")  # fmt: skip
            R.figure_distributions({k: dists[k] for k in ("sft", "rl") if k in dists},
                                   fig_dir / "score_distributions.png")  # fmt: skip
            R.figure_size_quality(variants, fig_dir / "size_quality.png")
        write_jsonl(args.samples, samples_out)
        with atomic_write(args.report) as f:
            f.write(R.markdown(report, side))
        tracker.log_report(report, "reports/metrics.json")
        tracker.log_artifacts(args.figures, "figures")
        tracker.log_text(args.report.read_text(), "report.md")
        write_json(args.metrics, report)
        headline = R.headline(report)
        write_json(args.headline, headline)
        tracker.log_pipeline_metrics(flatten_numeric(headline))


if __name__ == "__main__":
    stage.run(main, "evaluate")
