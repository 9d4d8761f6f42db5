"""Compression: the KD loss, structured pruning, the student's init, int8 quantization."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lmpipe import losses
from lmpipe.batches import IGNORE, Batch, Example
from lmpipe.compress.distill import (
    DistillLoss,
    MixedBatches,
    build_student,
    kd_loss_sum,
    teacher_shape,
)
from lmpipe.compress.prune import (
    magnitude_importance,
    prune,
    shrink,
    spread_layers,
    taylor_importance,
    top_k,
)
from lmpipe.compress.score import val_metrics, val_metrics_many
from lmpipe.config import CompressParams, ModelParams, ParamsError, parse_section
from lmpipe.model import build_model, load_model, n_params
from lmpipe.train import lm_loss_sum

SPECIAL = {"<|bos|>": 1, "<|eos|>": 2, "<|pad|>": 0}
VOCAB = 300


def tiny(arch: str = "llama", kv: int = 0, layers: int = 3, seed: int = 0):
    cfg = ModelParams(arch=arch, d_model=64, n_layers=layers, n_heads=4, n_kv_heads=kv, context=32)
    return build_model(cfg, VOCAB, SPECIAL, seed).eval()


def batch(n: int = 4, t: int = 20, seed: int = 0) -> Batch:
    x = torch.randint(3, VOCAB, (n, t + 1), generator=torch.Generator().manual_seed(seed))
    return Batch(x[:, :-1], x[:, 1:])


# ----------------------------------------------------------------------------- KD loss


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    t = torch.tensor([[[math.log(2.0), 0.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[0, IGNORE]])  # the second position carries no target
    # T = 1: p_t = (1/2, 1/4, 1/4), p_s uniform
    kl = 0.5 * math.log(0.5 * 3) + 2 * 0.25 * math.log(0.25 * 3)
    assert float(kd_loss_sum(s, t, labels)) == pytest.approx(kl, abs=1e-6)
    # T = 2 scales the logits by 1/2 and the loss by T² = 4
    pt = np.exp(np.array([math.log(2.0) / 2, 0, 0]))
    pt /= pt.sum()
    kl2 = float(np.sum(pt * np.log(pt * 3)))
    assert float(kd_loss_sum(s, t, labels, temperature=2.0)) == pytest.approx(4 * kl2, abs=1e-6)
    # α mixes in cross-entropy on the label: −log(1/3) for the uniform student
    mixed = 0.25 * kl + 0.75 * math.log(3)
    assert float(kd_loss_sum(s, t, labels, alpha=0.25)) == pytest.approx(mixed, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
@pytest.mark.parametrize("all_targets", [True, False])
@pytest.mark.parametrize("chunk_rows", [3, 1000])
def test_kd_loss_and_gradient_match_the_kl_of_two_log_softmaxes(
    temperature, alpha, all_targets, chunk_rows, monkeypatch
):
    """The fused loss (a chunk of rows at a time; 3 rows splits the 10 targets unevenly) gives
    the value and gradient of KL written out with autograd, in float64; the teacher gets none."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_rows * 11)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    if not all_targets:
        labels[0, :2] = IGNORE
    loss = kd_loss_sum(s, t, labels, temperature, alpha)
    grad, grad_t = torch.autograd.grad(loss, (s, t), allow_unused=True)
    s2 = s.detach().double().requires_grad_(True)
    sel = labels != IGNORE
    ref = alpha * temperature**2 * torch.nn.functional.kl_div(
        torch.log_softmax(s2[sel] / temperature, -1),
        torch.log_softmax(t.detach().double()[sel] / temperature, -1),
        log_target=True,
        reduction="sum",
    ) + (1 - alpha) * torch.nn.functional.cross_entropy(s2[sel], labels[sel], reduction="sum")
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert torch.allclose(grad.double(), s2.grad, atol=1e-6)
    assert grad_t is None or not grad_t.any()
    if not all_targets:
        assert (grad[0, :2] == 0).all()


def test_kd_loss_on_bf16_logits_gives_bf16_gradients_of_the_fp32_loss():
    """Under autocast the logits are bf16: the loss is the fp32 one of those logits, and the
    gradient is the fp32 gradient rounded to bf16 once."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 7, 50, generator=g).bfloat16().requires_grad_(True)
    t = torch.randn(3, 7, 50, generator=g).bfloat16()
    labels = torch.randint(0, 50, (3, 7), generator=g)
    loss = kd_loss_sum(s, t, labels, 2.0)
    (grad,) = torch.autograd.grad(loss * 0.01, s)
    s32 = s.detach().float().requires_grad_(True)
    ref = 4 * torch.nn.functional.kl_div(
        torch.log_softmax(s32 / 2, -1),
        torch.log_softmax(t.float() / 2, -1),
        log_target=True,
        reduction="sum",
    )
    (ref * 0.01).backward()
    assert grad.dtype == torch.bfloat16
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert torch.allclose(grad.float(), s32.grad, rtol=2**-7, atol=1e-8)


def test_kd_loss_is_zero_when_student_is_teacher():
    model = tiny()
    b = batch()
    loss = DistillLoss(model, temperature=2.0, alpha=1.0)(model, b)
    assert abs(float(loss)) < 1e-4  # summed over 80 targets, fp32 rounding only
    other = tiny(seed=1)
    assert float(DistillLoss(model, 2.0, 1.0)(other, b).detach()) > 1.0


def test_kd_loss_rejects_bad_settings():
    s = torch.zeros(1, 1, 3)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss_sum(s, s, torch.zeros(1, 1, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss_sum(s, s, torch.zeros(1, 1, dtype=torch.long), alpha=1.5)


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("arch,kv", [("llama", 0), ("llama", 2), ("gpt2", 0)])
def test_keeping_every_unit_reproduces_the_logits_exactly(arch, kv):
    model = tiny(arch, kv)
    imp = taylor_importance(model, [batch()], lm_loss_sum)
    heads = top_k(imp.heads, imp.heads.shape[1]) if imp.heads is not None else None
    same = shrink(model, top_k(imp.neurons, imp.neurons.shape[1]), heads)
    x = batch().input_ids
    with torch.no_grad():
        assert torch.equal(same(x).logits, model(x).logits)


@pytest.mark.parametrize("arch,kv,heads", [("llama", 0, 0.5), ("llama", 2, 0.5), ("gpt2", 0, 0)])
def test_pruned_model_is_smaller_and_loads_with_from_pretrained(tmp_path, arch, kv, heads):
    model = tiny(arch, kv)
    pruned = prune(model, magnitude_importance(model), mlp_fraction=0.3, head_fraction=heads)
    assert n_params(pruned) < n_params(model)
    d_ff = model.config.intermediate_size if arch == "llama" else model.config.n_inner
    new_ff = pruned.config.intermediate_size if arch == "llama" else pruned.config.n_inner
    assert new_ff == d_ff - int(0.3 * d_ff)
    if heads:
        assert pruned.config.num_attention_heads == 2
        assert pruned.config.num_key_value_heads == (1 if kv == 2 else 2)
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert n_params(loaded) == n_params(pruned)
    x = batch().input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, pruned(x).logits, atol=1e-5)


def test_gpt2_heads_cannot_be_pruned():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        prune(model, magnitude_importance(model), 0.3, 0.5)


def test_taylor_importance_is_the_squared_gradient_of_a_unit_mask():
    """(Σ_t a·∂L/∂a)² per sequence = (∂L_n/∂m)² for a mask m on the neuron, summed over n."""
    model = tiny()
    b = batch(n=3)
    imp = taylor_importance(model, [b], lm_loss_sum)
    assert all(p.grad is None for p in model.parameters())  # leaves the model as it found it
    layer = model.model.layers[1]
    expected = torch.zeros(imp.neurons.shape[1], dtype=torch.float64)
    expected_heads = torch.zeros(imp.heads.shape[1], dtype=torch.float64)
    for n in range(3):
        mask = torch.ones(imp.neurons.shape[1], requires_grad=True)
        hmask = torch.ones(imp.heads.shape[1], requires_grad=True)
        h1 = layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a, m=mask: (a[0] * m,))
        h2 = layer.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, a, m=hmask: ((a[0].unflatten(-1, (4, 16)) * m[:, None]).flatten(-2),)
        )
        one = Batch(b.input_ids[n : n + 1], b.labels[n : n + 1])
        model.zero_grad()
        lm_loss_sum(model, one).backward()
        h1.remove()
        h2.remove()
        expected += mask.grad.double() ** 2
        expected_heads += hmask.grad.double() ** 2
    torch.testing.assert_close(imp.neurons[1].double(), expected, rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(imp.heads[1].double(), expected_heads, rtol=1e-3, atol=1e-9)


def test_magnitude_importance_ranks_a_zeroed_neuron_last():
    model = tiny()
    with torch.no_grad():
        m = model.model.layers[0].mlp
        m.gate_proj.weight[5].zero_()
        m.up_proj.weight[5].zero_()
        m.down_proj.weight[:, 5].zero_()
    scores = magnitude_importance(model).neurons[0]
    assert int(scores.argmin()) == 5 and float(scores[5]) == 0.0
    assert 5 not in top_k(magnitude_importance(model).neurons, 100)[0]


def test_top_k_and_layer_spread():
    assert top_k(torch.tensor([[3.0, 1.0, 2.0, 5.0]]), 2) == [[0, 3]]
    assert spread_layers(4, 2) == [0, 3] and spread_layers(6, 3) == [0, 2, 5]
    assert spread_layers(4, 4) == [0, 1, 2, 3] and spread_layers(4, 1) == [3]
    with pytest.raises(ValueError):
        top_k(torch.ones(1, 3), 4)


# ----------------------------------------------------------------------------- the student


def test_student_from_teacher_copies_its_layers():
    teacher = tiny(layers=4)
    imp = taylor_importance(teacher, [batch()], lm_loss_sum)
    cfg = CompressParams(student_layers=2, student_d_ff=96, student_heads=2)
    student = build_student(teacher, cfg, imp, seed=0)
    assert student.config.num_hidden_layers == 2 and student.config.intermediate_size == 96
    assert student.config.num_attention_heads == 2
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    keep = top_k(imp.neurons, 96)[3]
    assert torch.equal(
        student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight[keep]
    )
    assert n_params(student) < n_params(teacher) / 2 + teacher.model.embed_tokens.weight.numel()


def test_student_random_init_and_shape_errors():
    teacher = tiny(layers=2)
    cfg = CompressParams(student_init="random", student_d_model=32, student_layers=1)
    student = build_student(teacher, cfg, None, seed=0)
    assert student.config.hidden_size == 32 and student.config.vocab_size == VOCAB
    assert teacher_shape(teacher.config).d_model == 64
    with pytest.raises(ParamsError, match="student_layers 3 > the teacher's 2"):
        build_student(teacher, CompressParams(student_layers=3), None, seed=0)
    with pytest.raises(ParamsError, match="student_init"):
        parse_section("compress", {"student_d_model": 32})


# ----------------------------------------------------------------------------- scoring


def test_val_metrics_of_several_models_in_one_pass():
    """Perplexity and KL(teacher ‖ model) per target token, by hand from the logits; several
    models in one pass give each model's own figures; the teacher against itself has KL 0."""
    teacher, student = tiny(seed=0), tiny(layers=1, seed=1)
    b = batch(n=3, t=10, seed=4)
    b = Batch(b.input_ids, b.labels.clone())  # labels are a view of the same tokens
    b.labels[0, :4] = IGNORE
    sel = b.labels != IGNORE
    with torch.no_grad():
        lt = torch.log_softmax(teacher(input_ids=b.input_ids).logits[sel], -1)
        ls = torch.log_softmax(student(input_ids=b.input_ids).logits[sel], -1)
    ce = float(-ls.gather(-1, b.labels[sel][:, None]).mean())
    kl = float((lt.exp() * (lt - ls)).sum(-1).mean())
    got = val_metrics_many({"t": teacher, "s": student}, teacher, [b, b])
    assert got["s"]["val_loss"] == pytest.approx(ce, rel=1e-5)
    assert got["s"]["val_ppl"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert got["s"]["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    assert got["t"]["kl_to_teacher"] == 0.0
    assert val_metrics(student, teacher, [b]) == pytest.approx(got["s"])


# ----------------------------------------------------------------------------- mixed batches


def test_mixed_batches_mix_resume_and_mask_prompts():
    tokens = np.arange(5000, dtype=np.uint16) % VOCAB
    ex = [Example([1, 5, 6, 7, 8], [IGNORE, IGNORE, 7, 8, 2]) for _ in range(10)]
    src = MixedBatches(tokens, 16, ex, batch_size=8, sample_fraction=0.25, seed=3, pad_id=0)
    windows, samples = src.next_batch().parts  # each part at its own width
    assert windows.input_ids.shape == (6, 16) and samples.input_ids.shape == (2, 5)
    assert (samples.labels[:, :2] == IGNORE).all() and (samples.labels[:, 2:] != IGNORE).all()
    assert (windows.labels != IGNORE).all()
    state = src.state_dict()
    a1, a2 = src.next_batch(), src.next_batch()
    src.load_state_dict(state)
    for a in (a1, a2):
        pairs = zip(src.next_batch().parts, a.parts, strict=True)
        assert all(torch.equal(x.input_ids, y.input_ids) for x, y in pairs)
    only_corpus = MixedBatches(tokens, 16, [], batch_size=4, sample_fraction=0.5, seed=3, pad_id=0)
    assert only_corpus.next_batch().input_ids.shape == (4, 16)


# ----------------------------------------------------------------------------- quantization


def test_int8_model_reloads_without_requantizing(tmp_path):
    from lmpipe.compress.quantize import describe, quantize_int8, save_quantized, weight_bytes

    model = tiny()
    q = quantize_int8(model, embeddings=True)
    (tmp_path / "tok").mkdir()
    save_quantized(q, tmp_path / "q", tmp_path / "tok", {"quantization": describe(True)})
    model.save_pretrained(tmp_path / "fp32")
    loaded = load_model(tmp_path / "q")  # the same loader as every lmpipe model
    w = loaded.model.layers[0].mlp.up_proj.weight
    assert w.qdata.dtype == torch.int8
    assert loaded.model.embed_tokens.weight.qdata.dtype == torch.int8
    x = batch().input_ids
    with torch.no_grad():
        ref, out, again = model(x).logits, q(x).logits, loaded(x).logits
    assert torch.equal(out, again)  # stored int8 tensors, not a second quantization
    # stated tolerance: |Δlogit| ≤ 0.05 and per-token KL(fp32 ‖ int8) ≤ 1e-3 nats
    assert float((out - ref).abs().max()) <= 0.05
    kl = (
        torch.nn.functional.kl_div(
            out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean"
        )
        / x.shape[1]
    )
    assert float(kl) <= 1e-3
    assert weight_bytes(tmp_path / "q") < 0.35 * weight_bytes(tmp_path / "fp32")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the original is untouched


def test_int8_loader_refuses_a_plain_folder(tmp_path):
    from lmpipe.model import load_quantized

    tiny().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="torchao"):
        load_quantized(tmp_path)
    with pytest.raises(ValueError, match="CPU"):
        load_quantized(tmp_path, "cuda")
