"""SFT: fine-tune the pretrained model on prompt/response pairs (loss on the response and EOS).

Run by DVC (see dvc.yaml), or under `torchrun --nproc_per_node=N stages/sft.py ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from lmpipe import dist, stage
from lmpipe import sft as S
from lmpipe.batches import PairBatches
from lmpipe.chat import load_template
from lmpipe.checkpoints import checkpoint_store
from lmpipe.config import load_params
from lmpipe.io import atomic_dir, write_json
from lmpipe.model import context_length, load_model, save_model
from lmpipe.tracking.report import model_card
from lmpipe.tracking.run import stage_run
from lmpipe.tracking.tracker import NullTracker
from lmpipe.train import train

log = logging.getLogger("sft")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", type=Path, required=True, help="pretrained model (models/pretrain)")
    ap.add_argument("--data", type=Path, required=True, help="prepared data (data/prepared)")
    ap.add_argument("--out", type=Path, required=True, help="model folder (models/sft)")
    ap.add_argument("--report", type=Path, required=True, help="metrics JSON")
    ap.add_argument("--plots", type=Path, required=True, help="per-step CSV")
    ap.add_argument("--cache", type=Path, default=Path(".cache/checkpoints"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    params = load_params(args.params, ["sft", "tracking"])
    cfg = params.sft
    info, device = dist.setup(cfg.device)
    template = load_template(args.data)
    pad = template.pad_id
    inputs = {"model": args.model, "data": args.data}

    run = stage_run("sft", params, params.tracking, inputs)
    with run if info.is_main else contextlib.nullcontext(NullTracker()) as tracker:
        model = load_model(args.model, device)
        train_ex, val_ex = S.read_examples(template, args.data, context_length(model))
        source = PairBatches(train_ex, cfg.batch_size, params.seed, pad, info.rank, info.world)
        # every rank evaluates the whole global batch's worth: the val set of one process
        val = PairBatches(val_ex, cfg.batch_size * info.world, 0, pad).fixed_batches(
            cfg.eval_batches
        )
        key = stage.checkpoint_key(params, inputs)
        store = checkpoint_store(args.cache, "sft", key)  # every rank resumes; rank 0 saves
        result = train(
            model,
            source,
            cfg,
            val_batches=val,
            tracker=tracker,
            checkpoints=store,
            plot_csv=args.plots,
            prefix="train",
        )
        if info.is_main:
            samples = S.eval_samples(model, template, args.data, cfg, params.seed)
            report = S.report(result, model, len(train_ex), samples, info.world)
            tracker.log_text(S.samples_text(samples), "samples.txt")
            with atomic_dir(args.out) as tmp:
                save_model(
                    model,
                    tmp,
                    args.data,
                    stage.manifest("sft", params, tracker.tags, report, store.directory.name),
                )
            tracker.log_outputs({"model": args.out})
            if params.tracking.log_models:
                card = model_card("sft", report, ("val_loss", "val_ppl", "eos_rate"))
                stage.log_model(tracker, args.out, "model", "policy", "lmpipe-sft-torch", card)
            tracker.log_report(report, "reports/sft.json")
            write_json(args.report, report)
            store.clear()
            log.info(
                "val loss %.4f, EOS rate %.2f, %.0f tokens/s",
                report["val_loss"],
                report["eos_rate"],
                report["tokens_per_sec"],
            )
    dist.teardown()


if __name__ == "__main__":
    stage.run(main, "sft")
