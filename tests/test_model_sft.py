"""Model build/save/load with plain transformers, and the SFT template and loss masking."""

import pytest
import torch
from tokenizers import Tokenizer

from lmpipe.batches import IGNORE, PairBatches, collate
from lmpipe.chat import ChatTemplate, plain_template
from lmpipe.config import ModelParams
from lmpipe.data.tokenizer import EOS, RESPONSE, save_tokenizer, special_ids, train_tokenizer
from lmpipe.model import build_model, ff_width, load_model, n_params, read_manifest, save_model
from lmpipe.sampling import sample_responses
from lmpipe.sft import encode_pair, prompt_ids
from lmpipe.train import lm_loss_sum

TEXTS = [
    f"The {a} cat sat on the {b} mat and felt {c}."
    for a in ("red", "big", "old", "shy")
    for b in ("blue", "warm", "soft")
    for c in ("happy", "sad", "calm")
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TEXTS, vocab_size=300, min_frequency=2)


@pytest.fixture(scope="module")
def template(tok) -> ChatTemplate:
    return plain_template(tok)


def small(arch="llama", **kw):
    return ModelParams(arch=arch, d_model=32, n_layers=2, n_heads=4, context=64, **kw)


@pytest.mark.parametrize(("arch", "kv"), [("llama", 2), ("llama", 0), ("gpt2", 0)])
def test_build_shapes_and_seed(tok, arch, kv):
    cfg = small(arch, n_kv_heads=kv)
    a = build_model(cfg, 300, special_ids(tok), seed=1)
    b = build_model(cfg, 300, special_ids(tok), seed=1)
    c = build_model(cfg, 300, special_ids(tok), seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config.pad_token_id != a.config.eos_token_id
    if arch == "llama":
        assert a.config.num_key_value_heads == (kv or 4)
        assert a.config.intermediate_size == ff_width(cfg) == 96  # 8/3·32 → 85 → rounded to 96
    assert a.get_input_embeddings().weight.data_ptr() == a.get_output_embeddings().weight.data_ptr()


def test_save_load_with_plain_transformers_and_generate(tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_tokenizer(tok, tmp_path / "tok")
    m = build_model(small(), 300, special_ids(tok), seed=0).eval()
    save_model(m, tmp_path / "m", tmp_path / "tok", {"stage": "test", "mlflow_run_id": "r1"})
    assert read_manifest(tmp_path / "m")["mlflow_run_id"] == "r1"
    assert (tmp_path / "m" / "model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    ids = torch.tensor([hf_tok.encode("The red cat")])
    torch.testing.assert_close(m(ids).logits, plain(ids).logits)
    out = plain.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=hf_tok.pad_token_id)
    assert out.shape[1] <= ids.shape[1] + 5
    assert n_params(load_model(tmp_path / "m")) == n_params(m)
    with pytest.raises(FileNotFoundError, match="not an lmpipe model folder"):
        load_model(tmp_path / "tok")


def test_sft_template_masks_prompt_and_keeps_eos(tok, template):
    ids = special_ids(tok)
    ex = encode_pair(template, "The red cat", "sat on the mat.", context=64)
    p = prompt_ids(template, "The red cat")
    assert p[-1] == ids[RESPONSE]
    assert ex.input_ids[: len(p)] == p
    assert len(ex.labels) == len(ex.input_ids)
    # every position up to the one holding RESPONSE predicts nothing
    assert ex.labels[: len(p) - 1] == [IGNORE] * (len(p) - 1)
    assert ex.labels[-1] == ids[EOS]  # the model learns to stop
    resp = tok.decode([t for t in ex.labels if t != IGNORE], skip_special_tokens=True)
    assert resp == "sat on the mat."
    # labels are the inputs shifted by one on the response part
    for t in range(len(p) - 1, len(ex.input_ids) - 1):
        assert ex.labels[t] == ex.input_ids[t + 1]
    assert encode_pair(template, "The red cat " * 40, "x", context=16) is None


def test_prompt_tokens_carry_no_loss(tok, template):
    """Changing the model's predictions at prompt positions leaves the SFT loss unchanged."""
    m = build_model(small(), 300, special_ids(tok), seed=0).eval()
    ex = encode_pair(template, "The red cat", "sat on the mat.", context=64)
    batch = collate([ex, encode_pair(template, "The big cat sat", "and felt calm.", context=64)], 0)
    logits = m(input_ids=batch.input_ids).logits.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    loss.backward()
    masked = batch.labels == IGNORE
    assert masked.any() and (~masked).any()
    assert torch.all(logits.grad[masked] == 0)
    assert torch.all(logits.grad[~masked].abs().sum(-1) > 0)
    assert torch.isclose(lm_loss_sum(m, batch), loss)


def test_pair_batches_epochs_and_resume(template):
    exs = [
        encode_pair(template, f"The {c} cat", "sat.", 64)
        for c in ("red", "big", "old", "shy", "blue")
    ]
    a = PairBatches(exs, 2, seed=0, pad_id=0)
    seen = [a.next_batch() for _ in range(2)]
    state = a.state_dict()
    nxt = [a.next_batch().input_ids for _ in range(4)]
    b = PairBatches(exs, 2, seed=0, pad_id=0)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next_batch().input_ids) for x in nxt)
    assert seen[0].input_ids.shape[0] == 2
    assert len(PairBatches(exs, 2, 0, 0).fixed_batches()) == 3  # all 5 examples, in order


def test_sampling_is_seeded_and_reports_eos(tok, template):
    m = build_model(small(), 300, special_ids(tok), seed=0)
    a = sample_responses(m, template, ["The red cat", "The old"], max_new_tokens=6, seed=3)
    b = sample_responses(m, template, ["The red cat", "The old"], max_new_tokens=6, seed=3)
    assert a == b
    assert all(s["n_tokens"] <= 6 for s in a)
    assert {s["prompt"] for s in a} == {"The red cat", "The old"}
