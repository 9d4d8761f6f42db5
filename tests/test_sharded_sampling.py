"""Sampling split across ranks: two gloo processes each sample their share of the prompts on
per-row streams and gather the rest, and both end with the list one process draws: the reward
stage's preference samples (`sample_responses` in groups of k) and compress's teacher samples
(`teacher_examples`)."""

import pickle

import torch
import torch.multiprocessing as mp

from lmpipe.chat import plain_template
from lmpipe.compress.distill import teacher_examples
from lmpipe.config import ModelParams
from lmpipe.data.tokenizer import special_ids, train_tokenizer
from lmpipe.model import build_model
from lmpipe.sampling import sample_responses

TEXTS = [
    f"The {a} cat sat on the {b} mat and felt {c}."
    for a in ("red", "big", "old", "shy")
    for b in ("blue", "warm", "soft")
    for c in ("happy", "sad", "calm")
]
PROMPTS = ["The red cat", "The old", "A big", "The warm mat", "The", "sat on"]
K = 3  # samples per prompt, kept together on one rank


def draws() -> dict:
    torch.manual_seed(0)
    tok = train_tokenizer(TEXTS, vocab_size=300, min_frequency=2)
    template = plain_template(tok)
    cfg = ModelParams(d_model=32, n_layers=2, n_heads=4, context=64)
    model = build_model(cfg, tok.get_vocab_size(), special_ids(tok), seed=0).eval()
    repeated = [p for p in PROMPTS for _ in range(K)]
    ids = [template.prompt_ids(p) for p in PROMPTS]
    stops, pad = template.stop_ids, template.pad_id
    return {
        "responses": sample_responses(
            model, template, repeated, 12, seed=5, batch_size=4, split_groups=K
        ),
        "whole": sample_responses(model, template, repeated, 12, seed=5, batch_size=64),
        "teacher": teacher_examples(
            model,
            ids,
            max_new_tokens=12,
            eos_id=stops,
            pad_id=pad,
            temperature=1.0,
            seed=5,
            batch_size=2,
        ),
    }


def worker(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        with open(f"{out}.{rank}", "wb") as f:
            pickle.dump(draws(), f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_draw_what_one_draws(tmp_path, monkeypatch):
    one = draws()
    assert one["responses"] == one["whole"]  # the batch size changes no draw
    assert [s["prompt"] for s in one["responses"]] == [p for p in PROMPTS for _ in range(K)]
    assert len({s["response"] for s in one["responses"]}) > len(PROMPTS)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(worker, args=(2, init, str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        with open(tmp_path / f"out.{rank}", "rb") as f:
            got = pickle.load(f)
        assert got["responses"] == one["responses"], rank
        assert got["teacher"] == one["teacher"], rank
