"""Export an lmpipe causal LM to one ONNX decoder graph with a KV cache, optimise it offline,
quantize it to int8, and check it against PyTorch.

`torch.onnx.export(..., dynamo=True)` traces a wrapper whose inputs are the flat cache tensors
(`past.<i>.key|value`, shape (batch, kv_heads, past, head_dim)) and whose outputs are the logits
and the grown cache (`present.<i>.key|value`); batch, sequence, total and past lengths are dynamic,
and past may be 0, so the same graph does prefill and decode.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from lmpipe.model import head_shape, set_attention
from lmpipe.onnx.runtime import left_pad
from lmpipe.sampling import cache_kwarg

TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja")
"""Copied into a bundle beside tokenizer.json: the special tokens' names and the chat template."""


def cache_shape(model: PreTrainedModel) -> dict[str, int]:
    _, kv, hd = head_shape(model)
    return {"layers": model.config.num_hidden_layers, "kv_heads": kv, "head_dim": hd}


def io_names(layers: int) -> tuple[list[str], list[str]]:
    cache = [f"{i}.{k}" for i in range(layers) for k in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *[f"past.{c}" for c in cache]]
    return inputs, ["logits", *[f"present.{c}" for c in cache]]


class CachedDecoder(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, *past) → (logits, *present), flat tensors."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{cache_kwarg(type(self.model)): cache},
            use_cache=True,
        )
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def export_decoder(model: PreTrainedModel, path: str | Path, opset: int = 18) -> None:
    """Write the decoder graph to `path` (fp32, CPU tracing)."""
    from torch.export import Dim

    # traced with torch's SDPA op, whatever kernel the model ran with on this device
    model = set_attention(model.float().cpu().eval(), "sdpa")
    c = cache_shape(model)
    b, s, p = 2, 3, 2  # sample sizes ≥ 2 so no dimension is specialised
    ids = torch.randint(5, model.config.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).expand(b, -1)
    past = [torch.zeros(b, c["kv_heads"], p, c["head_dim"]) for _ in range(2 * c["layers"])]
    batch, seq, total, prev = Dim("batch"), Dim("seq"), Dim("total"), Dim("past")
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: prev} for _ in past),
    }
    inputs, outputs = io_names(c["layers"])
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # axis-renaming notes of the exporter
        program = torch.onnx.export(
            CachedDecoder(model),
            (ids, mask, pos, *past),
            dynamic_shapes=shapes,
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            opset_version=opset,
            verbose=False,
            report=False,
        )
        program.save(str(path))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's and quantizer's INFO chatter (they log on the root logger)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def optimize(src: str | Path, dst: str | Path) -> None:
    """onnxruntime's extended graph optimisations, applied once and saved (CPU-portable)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def quantize_int8(
    src: str | Path, dst: str | Path, per_channel: bool = True, activations: bool = True
) -> None:
    """Dynamic int8 (weights int8 per output channel, activations quantized at run time) after
    onnxruntime's recommended pre-processing (shape inference and graph optimisation); or, with
    `activations=False`, int8 weights only (MatMulNBits, a scale per block of 32 inputs) and fp32
    activations, for models whose activations have outliers that one int8 scale per tensor
    cannot hold (SmolLM2-135M: max |logit diff| 49 dynamic, 2.1 weight-only)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not activations:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        with quiet():
            cfg = nbits.DefaultWeightOnlyQuantConfig(
                block_size=32, is_symmetric=True, bits=8, op_types_to_quantize=("MatMul",)
            )
            q = nbits.MatMulNBitsQuantizer(
                onnx.load(str(src)), bits=8, block_size=32, is_symmetric=True, algo_config=cfg
            )
            q.process()
            q.model.save_model_to_file(str(dst), use_external_data_format=False)
        return
    with tempfile.TemporaryDirectory() as tmp, quiet():
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(
            str(pre),
            str(dst),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gather"],
        )


def to_fp16(src: str | Path, dst: str | Path) -> None:
    """fp16 weights and compute for the CUDA execution provider; inputs and outputs (ids, cache,
    logits) stay fp32 so the runtime feeds it exactly like the fp32 model."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    for node in model.graph.node:  # the exporter's per-node debug info (stack traces)
        del node.metadata_props[:]
    with quiet():
        half = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, str(dst))


def build_bundle(
    model: PreTrainedModel,
    bundle: str | Path,
    *,
    tokenizer_file: str | Path,
    special_tokens: dict[str, int],
    generation: dict[str, Any],
    source: dict[str, Any],
    stop_ids: list[int] | None = None,
    opset: int = 18,
    int8: bool = True,
    per_channel: bool = True,
    int8_activations: bool = True,
    fp16: bool = False,
) -> None:
    """A self-contained bundle folder: graph-optimised fp32 model, optional int8 (CPU) and fp16
    (CUDA) models, the tokenizer with its chat template (the files beside `tokenizer_file`), and
    `bundle.json` (names, cache shape, special ids, stop ids, defaults, hashes, lineage)."""
    from lmpipe.io import hash_path, write_json
    from lmpipe.onnx.bundle import MANIFEST

    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        export_decoder(model, raw, opset)
        optimize(raw, bundle / "model.onnx")
        if int8:
            quantize_int8(raw, bundle / "model.int8.onnx", per_channel, int8_activations)
        if fp16:
            to_fp16(raw, bundle / "model.fp16.onnx")
    shutil.copy2(tokenizer_file, bundle / "tokenizer.json")
    for name in TEMPLATE_FILES:
        if (src := Path(tokenizer_file).parent / name).exists():
            shutil.copy2(src, bundle / name)
    layers = model.config.num_hidden_layers
    inputs, outputs = io_names(layers)
    ctx = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
    write_json(
        bundle / MANIFEST,
        {
            "format": "lmpipe-onnx-decoder/1",
            "files": {
                "fp32": "model.onnx",
                "int8": "model.int8.onnx" if int8 else None,
                "fp16": "model.fp16.onnx" if fp16 else None,
            },
            "inputs": inputs,
            "outputs": outputs,
            "cache": cache_shape(model),
            "opset": opset,
            "context": ctx,
            "vocab_size": model.config.vocab_size,
            "special_tokens": special_tokens,
            "stop_ids": list(stop_ids or [special_tokens["eos"]]),
            "generation": generation,
            "source": source,
            "sha256": {f.name: hash_path(f) for f in sorted(bundle.glob("*.onnx"))},
        },
    )


# ----------------------------------------------------------------------------- parity


@torch.no_grad()
def fp64_errors(model: PreTrainedModel, lm: Any, prompts: list[list[int]]) -> dict[str, float]:
    """How far PyTorch's fp32 logits and the ONNX model's are from the exact (fp64) ones, at
    every prefill position of each prompt (run alone: no padding). Two fp32 implementations of a
    deep model differ by their own rounding; this tells rounding from an export error."""
    import copy

    exact = copy.deepcopy(model).double().cpu().eval()
    model = model.float().cpu().eval()
    torch_err = onnx_err = 0.0
    for p in prompts:
        ids = torch.tensor([p])
        pos = torch.arange(len(p))[None]
        mask = torch.ones_like(ids)
        ref = exact(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0]
        t32 = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0].double()
        o32, _ = lm.forward(ids.numpy(), mask.numpy(), pos.numpy(), lm.empty_cache(1))
        torch_err = max(torch_err, float((t32 - ref).abs().max()))
        onnx_err = max(onnx_err, float((torch.from_numpy(o32[0]).double() - ref).abs().max()))
    return {"fp32_torch_vs_fp64": torch_err, "fp32_onnx_vs_fp64": onnx_err}


@torch.no_grad()
def parity(
    model: PreTrainedModel, lm: Any, prompts: list[list[int]], steps: int, pad: int
) -> dict[str, float]:
    """ONNX (`lm`: an OnnxLM) against PyTorch on left-padded prompts: max |logit difference| at
    prefill (real positions) and at each of `steps` greedy decode steps (both fed PyTorch's
    greedy tokens), the cached path against a full recompute, and whether the ONNX model's own
    greedy continuation equals PyTorch's for every prompt."""
    model = model.float().cpu().eval()
    ids, mask = left_pad(prompts, pad)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    t = model(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(pos),
        use_cache=True,
    )
    o_logits, past = lm.forward(ids, mask, pos, lm.empty_cache(len(prompts)))
    real = mask.astype(bool)
    prefill = float(np.abs(o_logits - t.logits.numpy())[real].max())
    cache = t.past_key_values
    seq, m = ids, mask
    nxt = t.logits[:, -1].argmax(-1).numpy()
    next_pos = mask.sum(-1, keepdims=True)
    step_diffs = []
    torch_tokens = [nxt]
    for _ in range(steps):
        m = np.concatenate([m, np.ones((len(prompts), 1), np.int64)], 1)
        seq = np.concatenate([seq, nxt[:, None]], 1)
        t = model(
            input_ids=torch.from_numpy(nxt[:, None]),
            attention_mask=torch.from_numpy(m),
            position_ids=torch.from_numpy(next_pos),
            **{cache_kwarg(type(model)): cache},
            use_cache=True,
        )
        cache = t.past_key_values
        o_logits, past = lm.forward(nxt[:, None], m, next_pos, past)
        step_diffs.append(float(np.abs(o_logits[:, -1] - t.logits[:, -1].numpy()).max()))
        next_pos = next_pos + 1
        nxt = t.logits[:, -1].argmax(-1).numpy()
        torch_tokens.append(nxt)
    # the cached ONNX logits of the last step against one ONNX pass over the whole sequence
    full_pos = np.clip(m.cumsum(-1) - 1, 0, None)
    full, _ = lm.forward(seq, m, full_pos, lm.empty_cache(len(prompts)))
    cached_vs_full = float(np.abs(full[:, -1] - o_logits[:, -1]).max())
    # free-running greedy continuations, EOS ignored by comparing the first `steps` tokens
    want = np.stack(torch_tokens[:steps], 1)
    got = onnx_greedy(lm, ids, mask, steps)
    same_rows = float(np.mean([np.array_equal(a, b) for a, b in zip(got, want, strict=True)]))
    return {
        "prefill_max_abs_logit_diff": prefill,
        "decode_max_abs_logit_diff": max(step_diffs) if step_diffs else 0.0,
        "max_abs_logit_diff": max([prefill, *step_diffs]),
        "cached_vs_recompute_max_abs_diff": cached_vs_full,
        "greedy_token_match": float(np.mean(got == want)),
        "greedy_sequences_identical": same_rows,
    }


def onnx_greedy(lm: Any, ids: np.ndarray, mask: np.ndarray, steps: int) -> np.ndarray:
    """`steps` greedy tokens per row from the ONNX model, EOS not treated specially."""
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits, past = lm.forward(ids, mask, pos, lm.empty_cache(len(ids)))
    next_pos = mask.sum(-1, keepdims=True)
    out = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], 1)
        logits, past = lm.forward(nxt[:, None], mask, next_pos, past)
        next_pos = next_pos + 1
    return np.stack(out, 1)


def perplexity(lm: Any, windows: np.ndarray) -> float:
    """exp(mean next-token NLL) of the ONNX model on token windows (B, T+1)."""
    ids, targets = windows[:, :-1], windows[:, 1:]
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    logits, _ = lm.forward(ids, mask, pos, lm.empty_cache(len(ids)))
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1).mean()
    return float(np.exp(nll))
