"""Export: ONNX bundles (KV cache, graph-optimised fp32 + int8) gated on parity with PyTorch.

Run by DVC (see dvc.yaml).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from lmpipe import stage
from lmpipe.chat import load_template
from lmpipe.config import load_params
from lmpipe.data.sources import DataError
from lmpipe.data.tokenizer import read_tokens
from lmpipe.io import atomic_dir, read_json, read_jsonl, write_json
from lmpipe.model import context_length, load_model, read_manifest
from lmpipe.onnx import export as ox
from lmpipe.onnx.runtime import OnnxLM
from lmpipe.tracking.report import model_card
from lmpipe.tracking.run import stage_run

log = logging.getLogger("export")


class ParityError(RuntimeError):
    """The fp32 ONNX model does not reproduce PyTorch within the gate."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rl", type=Path, required=True, help="RL policy (models/rl)")
    ap.add_argument("--compressed", type=Path, required=True, help="models/compressed")
    ap.add_argument("--data", type=Path, required=True, help="prepared data (prompts, val)")
    ap.add_argument("--out", type=Path, required=True, help="folder of bundles (models/onnx)")
    ap.add_argument("--report", type=Path, required=True, help="metrics JSON")
    args = ap.parse_args()

    params = load_params(args.params, ["export", "tracking"])
    cfg = params.export
    sources = {v: args.rl if v == "rl" else args.compressed / v for v in cfg.variants}
    for name, folder in sources.items():
        if not (folder / "lmpipe.json").exists():
            raise DataError(
                f"export.variants names {name!r} but {folder} is not a model folder; "
                "choose rl or a variant the compress stage made"
            )
    inputs = {"rl": args.rl, "compressed": args.compressed, "data": args.data}
    with stage_run("export", params, params.tracking, inputs) as tracker:
        template = load_template(args.data)
        special = {"bos": template.bos_id, "eos": template.eos_id, "pad": template.pad_id,
                   "end_of_turn": template.end_of_turn_id}  # fmt: skip
        if template.kind == "plain":  # bundles before chat templates read these two
            special["prompt"] = template.tokenizer.token_to_id("<|prompt|>")
            special["response"] = template.tokenizer.token_to_id("<|response|>")
        meta = read_json(args.data / "meta.json")
        val = np.asarray(read_tokens(args.data / "val.bin", meta["dtype"]), dtype=np.int64)
        rows = read_jsonl(args.data / "prompts" / "eval.jsonl")
        report: dict[str, dict] = {}
        with atomic_dir(args.out) as out:
            for name, folder in sources.items():
                t0 = time.perf_counter()
                model = load_model(folder)
                ctx = context_length(model)
                prompts = [p for r in rows if len(p := template.prompt_ids(r["prompt"])) < ctx // 2]
                prompts = prompts[: cfg.parity_prompts]
                bundle = out / name
                source = read_manifest(folder)
                ox.build_bundle(
                    model, bundle, tokenizer_file=args.data / "tokenizer.json",
                    special_tokens=special, stop_ids=list(template.stop_ids),
                    generation={"max_new_tokens": cfg.max_new_tokens,
                                "temperature": cfg.temperature, "top_k": cfg.top_k,
                                "top_p": cfg.top_p},
                    source={"variant": name, "path": str(folder), "stage": source.get("stage"),
                            "git_commit": source.get("git_commit")},
                    opset=cfg.opset, int8=cfg.int8, per_channel=cfg.int8_per_channel,
                    int8_activations=cfg.int8_activations, fp16=cfg.fp16,
                )  # fmt: skip
                row = check(model, bundle, prompts, val, ctx, cfg, template.pad_id)
                row["export_seconds"] = time.perf_counter() - t0
                report[name] = row
                log.info(
                    "%s: max |Δlogit| %.2e, greedy match %.3f, int8 greedy match %.3f, "
                    "int8 ppl %+.2f%%, %.2f MB / %.2f MB int8",
                    name, row["max_abs_logit_diff"], row["greedy_token_match"],
                    row.get("int8", {}).get("greedy_token_match", float("nan")),
                    100 * row.get("int8", {}).get("ppl_change", float("nan")), row["size_mb"],
                    row.get("int8", {}).get("size_mb", float("nan")),
                )  # fmt: skip
        for name in report:  # pyfunc models: mlflow.pyfunc.load_model generates text with them
            registered = f"lmpipe-{name}" if cfg.register_model else None
            card = model_card(f"{name} ONNX", report[name], CARD_KEYS)
            version = stage.log_model(tracker, args.out / name, f"onnx-{name}", "bundle",
                                      registered, card, {"lmpipe.variant": name})  # fmt: skip
            if registered:
                report[name]["registry_version"] = version
        tracker.log_outputs({"bundles": args.out})
        tracker.log_report(report, "reports/export.json")
        write_json(args.report, report)


CARD_KEYS = ("max_abs_logit_diff", "greedy_token_match", "size_mb", "int8.size_mb",
             "int8.greedy_token_match")  # fmt: skip
"""The figures a registered bundle's description gives."""

FP64_SLACK = 2.0
"""The ONNX model may be up to this many times PyTorch fp32's own distance from fp64 logits."""


def check(model, bundle: Path, prompts, val, ctx, cfg, pad) -> dict:
    """Parity gate on fp32 (raises ParityError), then the int8 and fp16 models' agreement and
    perplexity change."""
    lm = OnnxLM(bundle, providers=["CPUExecutionProvider"])
    row = ox.parity(model, lm, prompts, min(cfg.parity_steps, ctx // 2), pad)
    row["size_mb"] = (bundle / "model.onnx").stat().st_size / 1e6
    fails = []
    tol = cfg.max_logit_diff
    if row["max_abs_logit_diff"] > tol:
        # a deep model's two fp32 implementations differ by rounding alone: within the gate if
        # the ONNX logits are no further from exact (fp64) ones than PyTorch's fp32 logits are
        row.update(ox.fp64_errors(model, lm, prompts))
        tol = max(tol, FP64_SLACK * row["fp32_torch_vs_fp64"])
        row["parity_tolerance"] = tol
        if row["fp32_onnx_vs_fp64"] > FP64_SLACK * row["fp32_torch_vs_fp64"]:
            tol = cfg.max_logit_diff
    if row["max_abs_logit_diff"] > tol:
        fails.append(f"max |logit diff| {row['max_abs_logit_diff']:.3g} > {tol:.3g}")
    if row["cached_vs_recompute_max_abs_diff"] > tol:
        fails.append(f"cached vs recompute {row['cached_vs_recompute_max_abs_diff']:.3g}")
    if row["greedy_sequences_identical"] < 1.0:
        fails.append(f"greedy continuations identical on {row['greedy_sequences_identical']:.0%}")
    if fails:
        raise ParityError(f"{bundle.name}: the fp32 ONNX model misses the parity gate: "
                          + "; ".join(fails))  # fmt: skip
    n = cfg.ppl_batches * 8
    win = min(ctx, cfg.ppl_window) if cfg.ppl_window else ctx
    starts = np.linspace(0, len(val) - win - 1, n).astype(np.int64)
    windows = np.stack([val[s : s + win + 1] for s in starts])
    row["ppl"] = ox.perplexity(lm, windows)
    for precision in [p for p in ("int8", "fp16") if getattr(cfg, p)]:
        # checked with the CPU provider here; fp16 is meant for CUDA, where it runs natively
        q = OnnxLM(bundle, precision=precision, providers=["CPUExecutionProvider"])
        qrow = ox.parity(model, q, prompts, min(cfg.parity_steps, ctx // 2), pad)
        ppl = ox.perplexity(q, windows)
        row[precision] = {
            "max_abs_logit_diff": qrow["max_abs_logit_diff"],
            "greedy_token_match": qrow["greedy_token_match"],
            "greedy_sequences_identical": qrow["greedy_sequences_identical"],
            "ppl": ppl,
            "ppl_change": ppl / row["ppl"] - 1,
            "size_mb": (bundle / q.meta["files"][precision]).stat().st_size / 1e6,
        }
    return row


if __name__ == "__main__":
    stage.run(main, "export")
