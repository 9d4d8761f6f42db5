"""Pretrain: a causal LM from scratch on the prepared token files, or continued pretraining of
the base model (`base.model`); with a base and `pretrain.max_steps: 0` the base passes through.

Run by DVC (see dvc.yaml), or on N processes/GPUs with
    torchrun --nproc_per_node=N stages/pretrain.py --data data/prepared --out models/pretrain ...
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from pathlib import Path

from lmpipe import base as base_lib
from lmpipe import dist, stage
from lmpipe.baselines import bigram_loss, unigram_loss
from lmpipe.batches import TokenWindows
from lmpipe.checkpoints import checkpoint_store
from lmpipe.config import ParamsError, load_params
from lmpipe.data.tokenizer import read_tokens
from lmpipe.io import atomic_dir, read_json, write_history_csv, write_json
from lmpipe.model import build_model, n_params, save_model
from lmpipe.precision import use_bf16
from lmpipe.tracking.report import model_card
from lmpipe.tracking.run import stage_run
from lmpipe.tracking.tracker import NullTracker
from lmpipe.train import TrainResult, evaluate, train

log = logging.getLogger("pretrain")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, required=True, help="prepared data (data/prepared)")
    ap.add_argument("--out", type=Path, required=True, help="model folder (models/pretrain)")
    ap.add_argument("--report", type=Path, required=True, help="metrics JSON")
    ap.add_argument("--plots", type=Path, required=True, help="per-step CSV")
    ap.add_argument("--cache", type=Path, default=Path(".cache/checkpoints"))
    args = ap.parse_args()

    params = load_params(args.params, ["base", "model", "pretrain", "tracking"])
    cfg, mcfg = params.pretrain, params.model
    base = base_lib.resolve(params.base)
    if base is None and cfg.max_steps == 0:
        raise ParamsError(
            "pretrain.max_steps = 0 passes a base model through, but base.model is '' (from "
            "scratch): set pretrain.max_steps > 0 or name a base model"
        )
    info, device = dist.setup(cfg.device)
    meta = read_json(args.data / "meta.json")
    train_tokens = read_tokens(args.data / "train.bin", meta["dtype"])
    val_tokens = read_tokens(args.data / "val.bin", meta["dtype"])

    run = stage_run("pretrain", params, params.tracking, {"data": args.data})
    with run if info.is_main else contextlib.nullcontext(NullTracker()) as tracker:
        if base is None:
            model = build_model(mcfg, meta["vocab_size"], meta["special_tokens"], params.seed)
        else:
            model = base_lib.load_model(base)
            if model.get_input_embeddings().num_embeddings < meta["vocab_size"]:
                raise base_lib.BaseError(
                    f"base.model has {model.get_input_embeddings().num_embeddings} embeddings for "
                    f"a tokenizer of {meta['vocab_size']} tokens: the tokenizer is not the model's"
                )
        model.to(device)
        tracker.log_params({"model.n_params": n_params(model), "world_size": info.world})
        source = TokenWindows(
            train_tokens, mcfg.context, cfg.batch_size, params.seed, info.rank, info.world
        )
        # every rank evaluates the whole global batch's worth: the val set of one process
        val = TokenWindows(val_tokens, mcfg.context, cfg.batch_size * info.world, 0).fixed_batches(
            cfg.eval_batches
        )
        key = stage.checkpoint_key(params, {"data": args.data})
        store = checkpoint_store(args.cache, "pretrain", key)  # every rank resumes; rank 0 saves
        if cfg.max_steps:
            result = train(
                model, source, cfg, val_batches=val, tracker=tracker, checkpoints=store,
                plot_csv=args.plots, prefix="train",
            )  # fmt: skip
        else:  # the base as it is: its val loss, and the same tensors saved
            loss = evaluate(model, val, device, use_bf16(cfg.precision, device))
            result = TrainResult(loss, 0.0, 0.0, 0, 0)
            write_history_csv(args.plots, [{"step": 0, "eval/loss": loss}])
        if info.is_main:
            report = {
                "val_loss": result.val_loss,
                "val_ppl": math.exp(result.val_loss),
                "baseline_unigram_loss": unigram_loss(train_tokens, val_tokens, meta["vocab_size"]),
                "baseline_bigram_loss": bigram_loss(train_tokens, val_tokens, meta["vocab_size"]),
                "tokens_per_sec": result.tokens_per_sec,
                "train_seconds": result.train_seconds,
                "steps": result.steps,
                "params": n_params(model),
                "world_size": info.world,
                **({"base": params.base.model} if base else {}),
            }
            with atomic_dir(args.out) as tmp:
                save_model(
                    model,
                    tmp,
                    args.data,
                    stage.manifest("pretrain", params, tracker.tags, report, store.directory.name),
                )
            tracker.log_outputs({"model": args.out})
            if params.tracking.log_models:
                card = model_card("pretrain", report, ("val_loss", "val_ppl", "params"))
                stage.log_model(tracker, args.out, "model", "policy", "lmpipe-pretrain-torch", card)
            tracker.log_report(report, "reports/pretrain.json")
            write_json(args.report, report)
            store.clear()
            log.info(
                "val loss %.4f (bigram %.4f, unigram %.4f), %.0f tokens/s",
                report["val_loss"],
                report["baseline_bigram_loss"],
                report["baseline_unigram_loss"],
                report["tokens_per_sec"],
            )
    dist.teardown()


if __name__ == "__main__":
    stage.run(main, "pretrain")
