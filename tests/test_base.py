"""Base models: resolving `base.model` (folder, GGUF file, hub id), its fingerprint, loading,
prepare on a base's tokenizer and template, and the clear errors of a bad base."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from lmpipe import base as base_lib
from lmpipe.chat import load_template
from lmpipe.config import BaseParams, DataParams, TokenizerParams
from lmpipe.data.prepare import prepare
from lmpipe.data.tokenizer import read_tokens

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_base(folder: Path, template: str | None = CHATML) -> Path:
    """A tiny pretrained-style llama folder (GQA, tied embeddings) with a ChatML tokenizer whose
    PAD is its EOS, as SmolLM2's."""
    from lmpipe.data.builtin import generate_stories

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(generate_stories(200, seed=0), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=template,
    )
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder))
    hf.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"))


def test_resolve_kinds_and_bad_paths(base_dir, tmp_path, monkeypatch):
    assert base_lib.resolve(BaseParams()) is None
    b = base_lib.resolve(BaseParams(model=str(base_dir)))
    assert b.kind == "folder" and b.path == str(base_dir)
    hub = base_lib.resolve(BaseParams(model="HuggingFaceTB/SmolLM2-135M", revision="abc"))
    assert hub.kind == "hub" and hub.pretrained_kwargs() == {"revision": "abc"}
    with pytest.raises(base_lib.BaseError, match="does not exist"):
        base_lib.resolve(BaseParams(model=str(tmp_path / "nope")))
    with pytest.raises(base_lib.BaseError, match="no such GGUF file"):
        base_lib.resolve(BaseParams(model=str(tmp_path / "m.gguf")))
    with pytest.raises(base_lib.BaseError, match="without config.json"):
        base_lib.resolve(BaseParams(model=str(tmp_path)))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real_import = builtins.__import__

    def no_gguf(name, *a, **kw):
        if name == "gguf":
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(base_lib.BaseError, match="pip install gguf"):
        base_lib.resolve(BaseParams(model=str(gguf)))


def test_fingerprint_hashes_content_once(base_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hashes.json"
    b = base_lib.resolve(BaseParams(model=str(base_dir)))
    first = base_lib.fingerprint(b, cache)
    assert "model.safetensors" in first["sha256"] and first["kind"] == "folder"
    monkeypatch.setattr(base_lib, "_sha256", lambda p: pytest.fail(f"{p} hashed again"))
    assert base_lib.fingerprint(b, cache) == first
    assert base_lib.fingerprint(None) == {"model": "", "kind": "scratch"}


def test_load_model_and_tokenizer_errors(base_dir, tmp_path):
    b = base_lib.resolve(BaseParams(model=str(base_dir)))
    model = base_lib.load_model(b)
    ref = AutoModelForCausalLM.from_pretrained(str(base_dir))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(base_lib.BaseError, match="cannot load"):
        base_lib.load_model(base_lib.resolve(BaseParams(model=str(bad))))


def small_data() -> DataParams:
    return DataParams(
        builtin_stories=60, rl_prompts=8, eval_prompts=4, val_fraction=0.2, test_fraction=0.2
    )


def test_prepare_on_a_base_uses_its_tokenizer_and_template(base_dir, tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    report, _ = prepare(
        small_data(), TokenizerParams(), 0, out, base_cfg=BaseParams(model=str(base_dir))
    )
    t = load_template(out)
    assert t.kind == "chat" and report["template"]["stop_ids"] == [t.eos_id]
    assert (out / "chat_template.jinja").read_text() == CHATML
    meta = json.loads((out / "meta.json").read_text())
    assert (
        meta["vocab_size"] == Tokenizer.from_file(str(base_dir / "tokenizer.json")).get_vocab_size()
    )
    tokens = np.asarray(read_tokens(out / "train.bin", meta["dtype"]))
    assert (tokens == t.eos_id).sum() == report["documents"]["train"]  # one EOS per document
    # the template a model folder carries is the one transformers applies
    hf = PreTrainedTokenizerFast.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "Once upon a time"}]
    want = hf.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)
    assert t.prompt_ids("Once upon a time") == want["input_ids"]


def test_base_without_template(tmp_path):
    folder = make_base(tmp_path / "plainbase", template=None)
    out = tmp_path / "prepared"
    out.mkdir()
    with pytest.raises(base_lib.BaseError, match="no chat template"):
        prepare(
            small_data(),
            TokenizerParams(),
            0,
            out,
            base_cfg=BaseParams(model=str(folder), template="chat"),
        )
    prepare(small_data(), TokenizerParams(), 0, out, base_cfg=BaseParams(model=str(folder)))
    t = load_template(out)
    assert t.render([{"role": "user", "content": "Hi"}], True) == "Hi\n\n"


def run_stage(repo: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / script), "--params", "params.yaml", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env={
            "PATH": str(Path(sys.executable).parent),
            "LMPIPE_LOG_LEVEL": "WARNING",
            "HOME": str(repo),
            "PYTHONPATH": str(ROOT / "src"),
        },
    )


@pytest.mark.parametrize(
    ("base", "template", "message"),
    [
        ("missing/model.gguf", "auto", "no such GGUF file"),
        ("missing-folder/", "auto", "does not exist"),
        ("", "chat", "from scratch"),
    ],
)
def test_bad_base_stops_the_stage_with_exit_2(tmp_path, base, template, message):
    params = {
        "base": {"model": base, "template": template},
        "tracking": {"enabled": False},
        "data": {"builtin_stories": 20},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = run_stage(tmp_path, "prepare.py", "--out", "prepared", "--report", "r.json")
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "r.json").exists()
