"""Evaluate: one report card for every model the pipeline made (PyTorch folders and ONNX bundles).

Same held-out prompts, same sampling seed, same test text for each: perplexity; mean gold and
proxy score; KL to SFT on the model's own samples; distinct-1/2 and self-BLEU; response length and
EOS rate; generation speed; size on disk. Best-of-n from SFT is the reference RL must beat.
Writes reports/metrics.json, reports/samples.jsonl, reports/report.md and reports/figures/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmpipe import dist, stage
from lmpipe.chat import load_template
from lmpipe.config import load_params
from lmpipe.evaluate import card
from lmpipe.evaluate import report as R
from lmpipe.io import atomic_dir, atomic_write, write_json, write_jsonl
from lmpipe.tracking.report import flatten_numeric
from lmpipe.tracking.run import stage_run

CURVES = ("pretrain", "sft", "reward", "rl", "compress")


def parse_args() -> argparse.Namespace:
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
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    params = load_params(args.params, ["evaluate", "tracking"])
    cfg, seed, m = params.evaluate, params.seed, args.models
    device = str(dist.setup(cfg.device)[1])
    folders, bundles = card.find_models(m)
    inputs = {**folders, "reward": m / "reward", "onnx": m / "onnx", "data": args.data}

    with stage_run("evaluate", params, params.tracking, inputs) as tracker:
        template = load_template(args.data)
        judge, beta = card.judge_of(m / "reward", m / "rl", template, device)
        engines = card.load_engines(folders, bundles, template, device)
        context = min(e.context for e in engines)
        prompts = card.prompt_set(
            template,
            args.data,
            context,
            cfg.max_new_tokens,
            cfg.eval_prompts,
            cfg.samples_per_prompt,
            "evaluate",
        )
        windows = card.test_windows(args.data, context, cfg.ppl_context, cfg.ppl_windows)
        variants, scored, samples = card.evaluate_all(
            engines, prompts, judge, windows, cfg, seed, beta
        )
        sft = next(e for e in engines if e.name == "sft")
        best = card.best_of_n_table(
            sft, prompts, judge, cfg.best_of_n, cfg.max_new_tokens, seed + 1, beta
        )
        curves = {name: R.read_curves(args.plots / f"{name}.csv") for name in CURVES}
        flags = card.all_flags(m, curves, variants)
        report = {
            "variants": variants,
            "best_of_n": best,
            "flags": flags,
            "eval": R.settings(prompts, windows, cfg, seed, device),
        }
        with atomic_dir(args.figures) as fig_dir:
            R.write_figures(curves, best, variants, scored, fig_dir)
        write_jsonl(args.samples, samples)
        side = R.side_by_side({k: s.texts for k, s in scored.items()}, prompts, cfg.side_by_side)
        with atomic_write(args.report) as f:
            f.write(R.markdown(report, side))
        tracker.log_report(report, "reports/metrics.json")
        tracker.log_artifacts(args.figures, "figures")
        tracker.log_text(args.report.read_text(), "report.md")
        write_json(args.metrics, report)
        write_json(args.headline, headline := R.headline(report))
        tracker.log_pipeline_metrics(flatten_numeric(headline))


if __name__ == "__main__":
    stage.run(main, "evaluate")
