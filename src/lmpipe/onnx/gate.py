"""The export stage's work per variant: a bundle from the model folder (`export.build_bundle`)
with the prepared data's tokenizer, special tokens and the export params' generation defaults,
then the parity gate against PyTorch and the perplexity of each precision on validation windows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel

from lmpipe.chat import ChatTemplate, load_template
from lmpipe.config import ExportParams
from lmpipe.data.sources import DataError
from lmpipe.data.tokenizer import read_tokens
from lmpipe.io import read_json, read_jsonl
from lmpipe.model import context_length, load_model, read_manifest
from lmpipe.onnx import export as ox
from lmpipe.onnx.runtime import OnnxLM

log = logging.getLogger("export")


class ParityError(RuntimeError):
    """The fp32 ONNX model does not reproduce PyTorch within the gate."""


FP64_SLACK = 2.0
"""The ONNX model may be up to this many times PyTorch fp32's own distance from fp64 logits."""


def variant_sources(variants: list[str], rl: Path, compressed: Path) -> dict[str, Path]:
    """The model folder of each of `export.variants`: `rl` is the RL policy, any other name a
    folder the compress stage wrote; DataError for a name that is neither."""
    sources = {v: rl if v == "rl" else compressed / v for v in variants}
    for name, folder in sources.items():
        if not (folder / "lmpipe.json").exists():
            raise DataError(
                f"export.variants names {name!r} but {folder} is not a model folder; "
                "choose rl or a variant the compress stage made"
            )
    return sources


@dataclass
class Prepared:
    """What every variant's export reads from the prepared data folder."""

    data: Path
    template: ChatTemplate
    special: dict[str, int]  # the bundle's special token ids
    val: np.ndarray  # validation tokens (int64): the perplexity windows
    rows: list[dict[str, Any]]  # the eval prompts: the parity prompts

    @classmethod
    def load(cls, data: Path) -> Prepared:
        template = load_template(data)
        special = {
            "bos": template.bos_id,
            "eos": template.eos_id,
            "pad": template.pad_id,
            "end_of_turn": template.end_of_turn_id,
        }
        if template.kind == "plain":  # bundles before chat templates read these two
            special["prompt"] = template.tokenizer.token_to_id("<|prompt|>")
            special["response"] = template.tokenizer.token_to_id("<|response|>")
        meta = read_json(data / "meta.json")
        val = np.asarray(read_tokens(data / "val.bin", meta["dtype"]), dtype=np.int64)
        rows = read_jsonl(data / "prompts" / "eval.jsonl")
        return cls(data, template, special, val, rows)


def export_variant(
    name: str, folder: Path, bundle: Path, prepared: Prepared, cfg: ExportParams
) -> dict[str, Any]:
    """The bundle of the model in `folder`, gated (`check`): its report row, with the seconds
    the export and checks took."""
    t0 = time.perf_counter()
    model = load_model(folder)
    ctx = context_length(model)
    template = prepared.template
    prompts = [p for r in prepared.rows if len(p := template.prompt_ids(r["prompt"])) < ctx // 2]
    prompts = prompts[: cfg.parity_prompts]
    source = read_manifest(folder)
    ox.build_bundle(
        model,
        bundle,
        tokenizer_file=prepared.data / "tokenizer.json",
        special_tokens=prepared.special,
        stop_ids=list(template.stop_ids),
        generation={
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
        },
        source={
            "variant": name,
            "path": str(folder),
            "stage": source.get("stage"),
            "git_commit": source.get("git_commit"),
        },
        opset=cfg.opset,
        int8=cfg.int8,
        per_channel=cfg.int8_per_channel,
        int8_activations=cfg.int8_activations,
        fp16=cfg.fp16,
    )
    row = check(model, bundle, prompts, prepared.val, ctx, cfg, template.pad_id)
    row["export_seconds"] = time.perf_counter() - t0
    log.info(
        "%s: max |Δlogit| %.2e, greedy match %.3f, int8 greedy match %.3f, "
        "int8 ppl %+.2f%%, %.2f MB / %.2f MB int8",
        name,
        row["max_abs_logit_diff"],
        row["greedy_token_match"],
        row.get("int8", {}).get("greedy_token_match", float("nan")),
        100 * row.get("int8", {}).get("ppl_change", float("nan")),
        row["size_mb"],
        row.get("int8", {}).get("size_mb", float("nan")),
    )
    return row


def check(
    model: PreTrainedModel,
    bundle: Path,
    prompts: list[list[int]],
    val: np.ndarray,
    ctx: int,
    cfg: ExportParams,
    pad: int,
) -> dict[str, Any]:
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
        raise ParityError(
            f"{bundle.name}: the fp32 ONNX model misses the parity gate: " + "; ".join(fails)
        )
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
