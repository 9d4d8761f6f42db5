"""ONNX export with a KV cache, parity with PyTorch, int8, and the torch-free runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ONNX_SPECIAL as SPECIAL
from lmpipe.onnx.bundle import BundleError
from lmpipe.onnx.runtime import OnnxLM
from lmpipe.onnx.sampling import filter_logits, next_tokens, softmax

VOCAB = 300


def prompts() -> list[list[int]]:
    g = np.random.default_rng(0)
    return [[1, 3, *g.integers(5, VOCAB, n).tolist(), 4] for n in (3, 9, 1, 14)]  # mixed lengths


def test_fp32_bundle_passes_the_parity_gate(bundle):
    from lmpipe.onnx.export import parity

    model, path = bundle
    row = parity(model, OnnxLM(path), prompts(), steps=32, pad=0)
    assert row["prefill_max_abs_logit_diff"] <= 1e-4
    assert row["decode_max_abs_logit_diff"] <= 1e-4
    assert row["cached_vs_recompute_max_abs_diff"] <= 1e-4
    assert row["greedy_sequences_identical"] == 1.0 and row["greedy_token_match"] == 1.0


def test_bundle_manifest_names_everything_needed(bundle):
    _, path = bundle
    meta = json.loads((path / "bundle.json").read_text())
    assert meta["cache"] == {"layers": 2, "kv_heads": 2, "head_dim": 16}
    assert meta["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert meta["outputs"][0] == "logits" and len(meta["outputs"]) == 5
    assert set(meta["sha256"]) == {"model.onnx", "model.int8.onnx"}
    assert meta["special_tokens"] == SPECIAL and meta["context"] == 64


def test_onnx_generation_matches_torch_greedy(bundle):
    from lmpipe.sampling import generate

    model, path = bundle
    ps = prompts()
    want = generate(model, ps, max_new_tokens=12, eos_id=2, pad_id=0, greedy=True)
    got = OnnxLM(path).generate_ids(ps, max_new_tokens=12, temperature=0)
    for row, n, ended, mine in zip(
        want.response.tolist(), want.lengths.tolist(), want.ended.tolist(), got.tokens, strict=True
    ):
        assert mine == row[: n - int(ended)]


def test_int8_bundle_loads_and_generates(bundle):
    from lmpipe.onnx.export import parity

    model, path = bundle
    lm = OnnxLM(path, precision="int8")
    out = lm.generate_ids(prompts(), max_new_tokens=6, temperature=1.0, top_k=20, seed=1)
    assert len(out.tokens) == 4 and all(len(t) <= 6 for t in out.tokens)
    row = parity(model, lm, prompts(), steps=8, pad=0)
    assert row["max_abs_logit_diff"] < 0.5  # int8 is close, not exact
    assert (path / "model.int8.onnx").stat().st_size < (path / "model.onnx").stat().st_size


def test_weight_only_int8_keeps_fp32_activations_and_is_closer(bundle, tmp_path):
    """int8_activations: false quantizes the weights alone (MatMulNBits), for pretrained models
    whose activation outliers a per-tensor int8 activation scale cannot hold."""
    import onnx

    from lmpipe.onnx.export import export_decoder, parity, quantize_int8

    model, path = bundle
    export_decoder(model, tmp_path / "raw.onnx")
    quantize_int8(tmp_path / "raw.onnx", tmp_path / "w8.onnx", activations=False)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "w8.onnx")).graph.node}
    assert (
        "MatMulNBits" in ops and "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops
    )
    shutil.copytree(path, tmp_path / "b")
    shutil.copy(tmp_path / "w8.onnx", tmp_path / "b" / "model.int8.onnx")
    weight_only = parity(model, OnnxLM(tmp_path / "b", precision="int8"), prompts(), 8, 0)
    dynamic = parity(model, OnnxLM(path, precision="int8"), prompts(), 8, 0)
    assert weight_only["max_abs_logit_diff"] < dynamic["max_abs_logit_diff"]


def test_fp16_model_for_cuda_is_close_and_a_missing_file_is_named(bundle, tmp_path):
    """fp16 (meant for the CUDA provider) keeps fp32 inputs/outputs, so the same runtime feeds it;
    checked here on the CPU provider. A bundle without it says which files it has."""
    from lmpipe.onnx.export import build_bundle, parity

    model, path = bundle
    build_bundle(
        model,
        tmp_path / "h",
        tokenizer_file=path / "tokenizer.json",
        special_tokens=SPECIAL,
        generation={},
        source={"variant": "test"},
        int8=False,
        fp16=True,
    )
    meta = json.loads((tmp_path / "h" / "bundle.json").read_text())
    assert meta["files"] == {"fp32": "model.onnx", "int8": None, "fp16": "model.fp16.onnx"}
    lm = OnnxLM(tmp_path / "h", precision="fp16")
    row = parity(model, lm, prompts(), steps=8, pad=0)
    assert row["max_abs_logit_diff"] < 0.05 and row["greedy_token_match"] > 0.9
    size = (tmp_path / "h" / "model.fp16.onnx").stat().st_size
    assert size < 0.6 * (tmp_path / "h" / "model.onnx").stat().st_size
    with pytest.raises(BundleError, match="no int8 model file .it has: fp16, fp32"):
        OnnxLM(tmp_path / "h", precision="int8")


def test_generation_is_seeded_and_checks_lengths(bundle):
    _, path = bundle
    lm = OnnxLM(path)
    a = lm.generate_ids(prompts(), max_new_tokens=8, temperature=1.0, seed=3).tokens
    b = lm.generate_ids(prompts(), max_new_tokens=8, temperature=1.0, seed=3).tokens
    assert a == b
    with pytest.raises(ValueError, match="context"):
        lm.generate_ids([[1] * 60], max_new_tokens=8)
    with pytest.raises(ValueError, match="at least one token"):
        lm.generate_ids([[]], max_new_tokens=2)


def test_runtime_never_imports_torch(bundle):
    _, path = bundle
    code = (
        "import sys\n"
        "from lmpipe.onnx.runtime import OnnxLM\n"
        f"lm = OnnxLM({str(path)!r})\n"
        "out = lm.generate_ids([lm.prompt_ids('w7 w8')], max_new_tokens=4, temperature=0)\n"
        "print(len(out.tokens[0]), lm.decode(out.tokens[0]) is not None)\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_missing_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(BundleError, match="bundle.json"):
        OnnxLM(tmp_path)


# ----------------------------------------------------------------------------- sampling


def test_top_k_and_top_p_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert np.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    # nucleus 0.75: 0.5 then 0.3 reaches it; 0.15 and 0.05 go
    kept = np.isfinite(filter_logits(logits, top_p=0.75)[0])
    assert kept.tolist() == [True, True, False, False]
    assert np.isfinite(filter_logits(logits, top_p=0.01)[0]).sum() == 1  # the top token stays
    assert np.isfinite(filter_logits(logits)[0]).all()


def test_sampling_follows_the_filtered_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 20000))
    rng = np.random.default_rng(0)
    draws = next_tokens(logits, rng, temperature=1.0, top_p=0.75)
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)
    assert (next_tokens(logits[:3], rng, temperature=0) == 0).all()
    np.testing.assert_allclose(softmax(np.log([[1.0, 3.0]])), [[0.25, 0.75]])


def test_exported_graph_runs_on_torch_inputs_too(bundle):
    """The same graph takes an empty cache (prefill) and a non-empty one (decode)."""
    _, path = bundle
    lm = OnnxLM(path)
    ids = np.array([[1, 3, 7, 4]])
    mask = np.ones_like(ids)
    logits, present = lm.forward(ids, mask, np.arange(4)[None], lm.empty_cache(1))
    assert logits.shape == (1, 4, VOCAB) and present["past.0.key"].shape == (1, 2, 4, 16)
    step, grown = lm.forward(np.array([[9]]), np.ones((1, 5)), np.array([[4]]), present)
    assert step.shape == (1, 1, VOCAB) and grown["past.1.value"].shape == (1, 2, 5, 16)
    assert torch is not None  # the torch side is only for the parity tests above
