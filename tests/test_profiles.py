"""Params profiles: the GPU profile is valid and ~125M parameters; apply keeps comments and
refuses a bad profile without touching params.yaml."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from ruamel.yaml import YAML

from conftest import ROOT
from lmpipe.config import SECTIONS, ParamsError, flatten, load_params, load_yaml
from lmpipe.model import build_model
from lmpipe.profiles import apply, dvc_flags, read_profile

GPU = ROOT / "params" / "gpu-125m.yaml"


def test_gpu_profile_is_valid_and_about_125m_parameters(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply(GPU, params)
    p = load_params(params, list(SECTIONS))
    assert p.pretrain.precision == "bf16" and p.pretrain.compile
    with torch.device("meta"):
        model = build_model(
            p.model, p.tokenizer.vocab_size, {"<|bos|>": 1, "<|eos|>": 2, "<|pad|>": 0}, seed=0
        )
    n = sum(t.numel() for t in model.parameters())
    assert 115e6 < n < 135e6, n
    tokens_per_step = p.pretrain.batch_size * p.pretrain.grad_accum * p.model.context
    assert tokens_per_step == 2**19  # nanoGPT's ~0.5M tokens per optimizer step


def test_apply_keeps_comments_and_changes_only_the_profile_keys(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = yaml.safe_load(params.read_text())
    profile = tmp_path / "p.yaml"
    profile.write_text("rl:\n  kl_coef: 0.05\n  algo: rloo\nmodel:\n  d_model: 256\n")
    assert apply(profile, params) == ["rl.kl_coef", "rl.algo"]
    text = params.read_text()
    assert "# beta of the KL penalty / posterior temperature" in text
    after = yaml.safe_load(text)
    assert after["rl"]["kl_coef"] == 0.05 and after["rl"]["algo"] == "rloo"
    after["rl"].update(kl_coef=before["rl"]["kl_coef"], algo=before["rl"]["algo"])
    assert after == before


def test_a_nested_profile_key_changes_only_that_key(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = yaml.safe_load(params.read_text())
    profile = tmp_path / "p.yaml"
    profile.write_text("rl:\n  ppo:\n    epochs: 1\n")
    assert apply(profile, params) == ["rl.ppo.epochs"]
    after = yaml.safe_load(params.read_text())
    assert after["rl"]["ppo"]["epochs"] == 1
    after["rl"]["ppo"]["epochs"] = before["rl"]["ppo"]["epochs"]
    assert after == before


def test_an_exponent_written_without_a_dot_is_applied_as_a_number(tmp_path):
    """A profile's `lr: 5e-5` lands in params.yaml as a number, not the quoted string '5e-5'
    that YAML 1.1 would make of it (which DVC and `dvc exp show` would then compare as text)."""
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    profile = tmp_path / "p.yaml"
    profile.write_text("rl:\n  lr: 5e-5\n")
    assert apply(profile, params) == ["rl.lr"]
    line = next(ln for ln in params.read_text().splitlines() if ln.strip().startswith("lr: 5"))
    assert "'" not in line and '"' not in line, line
    assert load_yaml(params.read_text())["rl"]["lr"] == 5e-5
    assert YAML(typ="safe").load(params.read_text())["rl"]["lr"] == 5e-5  # as DVC reads it
    assert dvc_flags(profile, params) == ["-S", "rl.lr=5.0e-05"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rl:\n  kl_cof: 0.05\n", "unknown key"),
        ("rl:\n  algo: a2c\n", "rl.algo"),
        ("rl:\n  clip: 0.1\n", "moved to rl.ppo.clip"),
        ("rl:\n  ppo:\n    clip: -1\n", "rl.ppo.clip"),
        ("reinforce:\n  x: 1\n", "unknown params section"),
    ],
)
def test_a_bad_profile_is_refused_and_params_yaml_untouched(tmp_path, text, message):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    original = params.read_text()
    profile = tmp_path / "p.yaml"
    profile.write_text(text)
    with pytest.raises(ParamsError, match=message):
        apply(profile, params)
    with pytest.raises(ParamsError, match=message):
        dvc_flags(profile, params)
    assert params.read_text() == original


def test_flags_name_every_profile_key_once():
    flags = dvc_flags(GPU, ROOT / "params.yaml")
    keys = [f.split("=", 1)[0] for f in flags[1::2]]
    assert flags[::2] == ["-S"] * len(keys)
    assert keys == list(flatten(read_profile(GPU)))
    assert "model.d_model=768" in flags and "pretrain.compile=true" in flags
