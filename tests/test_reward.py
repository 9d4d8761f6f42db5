"""Reward modelling: gold scorers, the noisy labeller, the Bradley–Terry loss and its gradient,
a reward model that separates a synthetic problem, the file source, normalisation, loading."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lmpipe.chat import plain_template
from lmpipe.config import ModelParams, PreferenceParams, RewardParams
from lmpipe.data.sources import DataError
from lmpipe.data.tokenizer import save_tokenizer, special_ids, train_tokenizer
from lmpipe.gold import make_gold
from lmpipe.model import build_model, save_model
from lmpipe.reward import preferences
from lmpipe.reward.data import (
    PreferenceBatches,
    PreferenceExample,
    PreferenceGroup,
    group_pairs,
    preference_groups,
    read_preference_file,
    val_prompts,
)
from lmpipe.reward.labels import expected_agreement, label_pairs, preference_prob
from lmpipe.reward.metrics import pair_metrics
from lmpipe.reward.model import (
    RewardModel,
    build_reward_model,
    encode_for_reward,
    fit_normalisation,
)
from lmpipe.reward.preferences import sample_and_label
from lmpipe.reward.scoring import raw_scores, sequence_scores, shared_prompt_layout
from lmpipe.reward.training import bradley_terry_loss, preference_loss_sum
from lmpipe.train import train

SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|prompt|>": 3, "<|response|>": 4}


# --------------------------------------------------------------------------- gold scorers


def test_gold_scorers():
    vader = make_gold("vader")
    s = vader(["p", "p"], ["What a wonderful, happy day!", "This is awful and sad."])
    assert s[0] > 0.5 and s[1] < -0.5
    kw = make_gold("keyword", keywords=["glad", "smiled"])
    hits = kw(["p"] * 3, ["She smiled.", "GLAD to see you", "gladly not a word match"])
    assert hits.tolist() == [1.0, 1.0, 0.0]
    assert make_gold("length")(["p"], ["one two three"]).tolist() == [3.0]
    with pytest.raises(ValueError, match="unknown gold scorer 'nope'"):
        make_gold("nope")
    with pytest.raises(ValueError, match="at least one word"):
        make_gold("keyword", keywords=[])


# --------------------------------------------------------------------------- labeller


def test_labeller_with_tau_zero_follows_gold_exactly():
    rng = np.random.default_rng(0)
    for _ in range(50):
        g = rng.normal(size=5)
        for lab in label_pairs(g, 0.0, rng):
            assert g[lab["chosen"]] > g[lab["rejected"]]
            assert lab["p_chosen"] == 1.0
    assert len(label_pairs(np.arange(4.0), 0.0, rng)) == 6  # every pair once


def test_labeller_agreement_at_tau_one_matches_expectation():
    rng = np.random.default_rng(1)
    golds = rng.uniform(-1, 1, size=(4000, 2))
    agree, a, b = [], [], []
    for g in golds:
        (lab,) = label_pairs(g, 1.0, rng)
        agree.append(g[lab["chosen"]] > g[lab["rejected"]])
        a.append(g[0])
        b.append(g[1])
    expected = expected_agreement(np.array(a), np.array(b), 1.0)
    se = np.sqrt(expected * (1 - expected) / len(agree))
    assert 0.55 < expected < 0.7  # noisy labeller: far from perfect
    assert abs(np.mean(agree) - expected) < 4 * se
    assert preference_prob(np.array([0.3]), np.array([0.3]), 0.0)[0] == 0.5


# --------------------------------------------------------------------------- loss


def test_bradley_terry_loss_and_gradient_match_finite_differences():
    torch.manual_seed(0)
    rc = torch.randn(7, dtype=torch.float64, requires_grad=True)
    rr = torch.randn(7, dtype=torch.float64, requires_grad=True)
    margin = 0.3
    loss = bradley_terry_loss(rc, rr, margin).sum()
    ref = -torch.log(torch.sigmoid(rc - rr - margin)).sum()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    eps = 1e-6
    for x, grad in ((rc, rc.grad), (rr, rr.grad)):
        for i in range(len(x)):
            with torch.no_grad():
                x[i] += eps
                up = bradley_terry_loss(rc, rr, margin).sum()
                x[i] -= 2 * eps
                down = bradley_terry_loss(rc, rr, margin).sum()
                x[i] += eps
            assert abs(float((up - down) / (2 * eps)) - float(grad[i])) < 1e-6
    # huge gaps stay finite
    big = bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4]))
    assert torch.isfinite(big).all() and float(big) == pytest.approx(2e4)


# --------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A tiny causal LM saved as an lmpipe model folder (stands in for models/sft)."""
    d = tmp_path_factory.mktemp("sft")
    cfg = ModelParams(d_model=32, n_layers=2, n_heads=2, context=32)
    save_model(build_model(cfg, 32, SPECIAL, seed=0), d, d, {"stage": "sft"})
    return d


def synthetic_pairs(n: int, seed: int, k: int = 4) -> tuple[list[PreferenceExample], list[str]]:
    """n groups of k sequences of tokens 5..31 (one "prompt" each), every pair labelled: the
    preferred one holds more 7s than 9s (a rule over the whole sequence, at varying positions —
    not readable off the last token). Returns the pairs and each pair's prompt key."""
    rng = np.random.default_rng(seed)
    out, keys = [], []
    for g in range(n):
        seqs = [
            [1, 3, *rng.integers(5, 32, size=int(rng.integers(6, 20))).tolist(), 2]
            for _ in range(k)
        ]
        score = [s.count(7) - s.count(9) for s in seqs]
        for i in range(k):
            for j in range(i + 1, k):
                if score[i] != score[j]:
                    c, r = (i, j) if score[i] > score[j] else (j, i)
                    out.append(PreferenceExample(seqs[c], seqs[r]))
                    keys.append(f"prompt {g}")
    return out, keys


@pytest.mark.parametrize("pooling", ["last", "mean", "sum"])
def test_reward_model_separates_a_synthetic_problem(backbone, pooling):
    torch.manual_seed(0)
    model = build_reward_model(backbone, seed=0, pooling=pooling, response_token_id=3)
    assert model.config.num_labels == 1
    (train_ex, train_keys), (val_ex, val_keys) = synthetic_pairs(400, 0), synthetic_pairs(80, 1)
    cfg = RewardParams(
        lr=3e-3,
        max_steps=300,
        batch_size=6,
        warmup_steps=10,
        eval_every=100,
        log_every=50,
        checkpoint_every=0,
        device="cpu",
    )
    val = PreferenceBatches(group_pairs(val_ex, val_keys), 16, 0, 0).fixed_batches()
    source = PreferenceBatches(group_pairs(train_ex, train_keys), cfg.batch_size, 0, 0)
    res = train(model, source, cfg, val_batches=val, loss_sum=preference_loss_sum())
    rc = raw_scores(model, [e.chosen for e in val_ex], 0)
    rr = raw_scores(model, [e.rejected for e in val_ex], 0)
    acc = float(np.mean(rc > rr))
    assert acc >= 0.95, f"held-out accuracy {acc:.3f}, val loss {res.val_loss:.3f}"


def test_group_pairs_merges_a_prompts_pairs_and_shares_its_sequences():
    a, b, c, d = [1, 5, 2], [1, 6, 2], [1, 7, 7, 2], [1, 8, 2]
    pairs = [PreferenceExample(a, b), PreferenceExample(c, a), PreferenceExample(d, b)]
    groups = group_pairs([*pairs, PreferenceExample(a, d)], ["p", "p", "q", "p"])
    assert groups[0] == PreferenceGroup(
        (tuple(a), tuple(b), tuple(c), tuple(d)), ((0, 1), (2, 0), (0, 3))
    )
    assert groups[1] == PreferenceGroup((tuple(d), tuple(b)), ((0, 1),))
    batch = PreferenceBatches(groups, 2, 0, 0).fixed_batches()[0]
    assert batch.n_targets == 4 and batch.input_ids.shape == (6, 4)  # 6 distinct rows, not 8
    rows = batch.input_ids.tolist()
    chosen = [[t for t in rows[i] if t] for i in batch.chosen.tolist()]
    rejected = [[t for t in rows[i] if t] for i in batch.rejected.tolist()]
    assert chosen == [a, c, a, d] and rejected == [b, a, d, b]


def test_preference_groups_follow_reward_batching():
    a, b, c = [1, 5, 2], [1, 6, 2], [1, 7, 2]
    row = {"prompt": "p"}
    encoded = [(PreferenceExample(a, b), row), (PreferenceExample(c, a), row)]
    assert preference_groups(encoded, "pair") == [
        PreferenceGroup((tuple(a), tuple(b)), ((0, 1),)),
        PreferenceGroup((tuple(c), tuple(a)), ((0, 1),)),
    ]
    assert preference_groups(encoded, "prompt") == [
        PreferenceGroup((tuple(a), tuple(b), tuple(c)), ((0, 1), (2, 0)))
    ]
    with pytest.raises(ValueError, match="reward.batching 'prompts'"):
        preference_groups(encoded, "prompts")


def test_grouped_batches_give_the_loss_and_gradient_of_separate_pairs(backbone):
    """Scoring each response once per prompt changes the cost, not the loss: the summed
    Bradley–Terry loss and its gradient equal those of the same pairs batched one by one."""
    (ex, keys) = synthetic_pairs(3, 2, k=4)
    loss_sum = preference_loss_sum(margin=0.5)
    grads, losses = [], []
    for groups in (group_pairs(ex, keys), [PreferenceGroup.of_pair(e) for e in ex]):
        model = build_reward_model(backbone, seed=3, pooling="mean", response_token_id=3)
        batch = PreferenceBatches(groups, len(groups), 0, 0).fixed_batches()[0]
        assert batch.n_targets == len(ex)
        loss = loss_sum(model, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert len(group_pairs(ex, keys)) == 3 < len(ex)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_an_offset_shifts_each_rows_score_in_the_loss(backbone):
    """`preference_loss_sum`'s offset is a fixed score added to each row's: the loss is the
    Bradley–Terry loss of the sums, and the model still takes its gradient through it."""
    (ex, keys) = synthetic_pairs(2, 2, k=3)
    model = build_reward_model(backbone, seed=3, pooling="mean", response_token_id=3)
    batch = PreferenceBatches(group_pairs(ex, keys), 2, 0, 0).fixed_batches()[0]
    shift = torch.linspace(-2.0, 3.0, batch.input_ids.shape[0])
    loss = preference_loss_sum(offset=lambda b: shift)(model, batch)
    r = sequence_scores(model, batch.input_ids, lengths=batch.lengths).float() + shift
    expected = bradley_terry_loss(r[batch.chosen], r[batch.rejected]).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    plain = preference_loss_sum()(model, batch)
    assert abs(loss.item() - plain.item()) > 1e-3  # the offset moved it
    loss.backward()
    assert all(p.grad is not None for p in model.score.parameters())


@pytest.mark.parametrize("pooling", ["last", "mean", "sum"])
def test_scores_ignore_right_padding(backbone, pooling):
    model = build_reward_model(backbone, seed=1, pooling=pooling, response_token_id=3).eval()
    seqs = [[1, 3, 10, 11, 4, 12, 2], [1, 3, 10, 4, 2]]
    batched = raw_scores(model, seqs, 0)
    alone = [raw_scores(model, [s], 0)[0] for s in seqs]
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-6)


def test_raw_scores_keep_input_order_through_dedupe_and_length_sort(backbone):
    """Repeated sequences (a held-out response sits in k - 1 pairs) are scored once, batches
    are sorted by length; the output still lines up with the input, duplicates included."""
    model = build_reward_model(backbone, seed=1, pooling="mean", response_token_id=3).eval()
    a, b, c = [1, 3, 10, 11, 4, 12, 13, 14, 2], [1, 3, 10, 4, 2], [1, 3, 12, 4, 15, 2]
    seqs = [a, b, a, c, b, a]
    got = raw_scores(model, seqs, 0, batch_size=2)
    alone = {tuple(s): raw_scores(model, [s], 0)[0] for s in (a, b, c)}
    np.testing.assert_allclose(got, [alone[tuple(s)] for s in seqs], rtol=1e-5, atol=1e-6)
    assert len(set(np.round(got, 6))) == 3
    assert raw_scores(model, [], 0).shape == (0,)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("pooling", ["last", "mean", "sum"])
def test_shared_prompts_give_the_plain_scores_and_gradients(tmp_path, arch, pooling):
    """Rows that share a prompt run it once (`shared_prompt_layout`): the same scores and the
    same gradients as the plain pass, for prompts of different lengths, responses of different
    lengths, and a response that holds a RESPONSE token itself (not a response position)."""
    cfg = ModelParams(arch=arch, d_model=32, n_layers=2, n_heads=2, context=32)
    save_model(build_model(cfg, 32, SPECIAL, seed=0), tmp_path, tmp_path, {"stage": "sft"})
    p, q = [1, 3, 10, 11, 12, 4], [1, 3, 13, 4]
    seqs = [[*p, 20, 21, 2], [*q, 22, 2], [*p, 23, 4, 24, 25, 26, 2], [*q, 27, 28, 29, 2]]
    ids = torch.zeros((4, 12), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    layout = shared_prompt_layout(ids, 4, 0)
    assert layout.prompt_ids.tolist() == [p, [0, 0, *q]] and layout.owner.tolist() == [0, 1, 0, 1]
    assert layout.response_ids.tolist()[2] == [23, 4, 24, 25, 26, 2]
    assert layout.n_tokens == 2 * 6 + 4 * 6 < ids.numel()
    results = []
    for share in (False, True):
        model = build_reward_model(tmp_path, seed=1, pooling=pooling, response_token_id=4)
        scores = sequence_scores(model, ids, share_prompts=share)
        (scores * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        results.append((scores.detach(), [t.grad.clone() for t in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_shared_prompt_layout_only_where_it_applies():
    both = torch.tensor([[1, 3, 9, 4, 5, 2], [1, 3, 9, 4, 6, 2]])
    assert shared_prompt_layout(both, 4, 0) is not None
    assert shared_prompt_layout(both[:1], 4, 0) is None  # one row
    for rows in (
        [[1, 3, 9, 4, 5, 2], [1, 3, 8, 4, 6, 2]],  # no prompt repeats
        [[1, 3, 9, 4, 5, 2], [1, 3, 9, 7, 6, 2]],  # a row without RESPONSE
        [[1, 3, 9, 4, 5], [1, 3, 9, 4, 0]],  # a row with nothing after it
    ):
        assert shared_prompt_layout(torch.tensor(rows), 4, 0) is None


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_pooling_reduces_the_head_over_response_positions(backbone, pooling):
    """By hand: the head at each position after RESPONSE (EOS included, pads not), averaged or
    summed; a sequence without RESPONSE pools all its tokens."""
    model = build_reward_model(backbone, seed=2, pooling=pooling, response_token_id=4).eval()
    ids = torch.tensor([[1, 3, 10, 11, 4, 12, 13, 2, 0, 0], [1, 3, 10, 12, 13, 14, 2, 0, 0, 0]])
    with torch.no_grad():
        head = model.score(model.base_model(input_ids=ids).last_hidden_state).squeeze(-1)
        got = sequence_scores(model, ids)
    reduce = torch.mean if pooling == "mean" else torch.sum
    want = [reduce(head[0, 5:8]), reduce(head[1, :7])]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)
    # what follows the EOS (padding) changes nothing
    padded = ids.clone()
    padded[0, 8:] = 0
    padded = torch.cat([padded, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(model, padded), got, rtol=1e-5, atol=1e-6)


def test_pooling_is_saved_with_the_model(backbone, tmp_path):
    model = build_reward_model(backbone, seed=0, pooling="mean", response_token_id=4)
    save_model(model, tmp_path / "rm", backbone, {"normalization": {"gain": 2.0, "bias": 1.0}})
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    assert loaded.config.lmpipe_reward_pooling == "mean"
    assert loaded.config.lmpipe_response_token_id == 4
    seqs = [[1, 3, 10, 4, 12, 2], [1, 3, 4, 9, 9, 9, 2]]
    np.testing.assert_allclose(raw_scores(loaded, seqs, 0), raw_scores(model, seqs, 0), rtol=1e-5)
    # plain transformers reads the last token: a different number, which is why lmpipe scores
    # through sequence_scores (and RewardModel) only
    with torch.no_grad():
        last = float(loaded(torch.tensor([seqs[0]])).logits[0, 0])
    assert last != pytest.approx(raw_scores(model, seqs[:1], 0)[0], rel=1e-3)
    with pytest.raises(ValueError, match="not one of"):
        build_reward_model(backbone, seed=0, pooling="max")


def test_normalisation_and_round_trip(backbone, tmp_path):
    raw = np.random.default_rng(0).normal(3.0, 2.0, size=1000)
    norm = fit_normalisation(raw)
    scaled = norm["gain"] * raw + norm["bias"]
    assert abs(scaled.mean()) < 1e-9 and abs(scaled.std() - 1) < 1e-9
    with pytest.raises(ValueError, match="one score to everything"):
        fit_normalisation(np.ones(10))

    tok = train_tokenizer([f"the cat number {i} sat" for i in range(50)], 300, 1)
    save_tokenizer(tok, tmp_path / "tok")
    cfg = ModelParams(d_model=32, n_layers=1, n_heads=2, context=32)
    save_model(build_model(cfg, 300, special_ids(tok), 0), tmp_path / "sft", tmp_path / "tok", {})
    model = build_reward_model(tmp_path / "sft", seed=0)
    save_model(model, tmp_path / "rm", tmp_path / "tok", {"normalization": norm})
    rm = RewardModel.load(tmp_path / "rm")
    ids = encode_for_reward(plain_template(tok), "the cat", "sat down", 32)
    want = norm["gain"] * raw_scores(model, [ids], rm.pad_id)[0] + norm["bias"]
    assert rm.score_text(["the cat"], ["sat down"])[0] == pytest.approx(want, rel=1e-5)
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    assert float(plain(torch.tensor([ids])).logits[0, 0]) == pytest.approx(
        raw_scores(model, [ids], rm.pad_id)[0], rel=1e-5
    )
    save_model(model, tmp_path / "rm2", tmp_path / "tok", {})
    with pytest.raises(FileNotFoundError, match="no reward normalisation"):
        RewardModel.load(tmp_path / "rm2")


# --------------------------------------------------------------------------- data


def test_preference_file_good_and_malformed(tmp_path):
    good = tmp_path / "good.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_preference_file(good) == rows
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: no field 'rejected'"):
        read_preference_file(bad)
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_preference_file(bad)
    bad.write_text(json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'chosen' must be a string"):
        read_preference_file(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_preference_file(tmp_path / "missing.jsonl")


def test_val_prompts_split_by_prompt():
    prompts = [f"p{i % 20}" for i in range(100)]
    held = val_prompts(prompts, 0.2, seed=3)
    assert len(held) == 4 and held == val_prompts(prompts, 0.2, seed=3)
    with pytest.raises(DataError, match="cannot be split"):
        val_prompts(["a", "a"], 0.5, 0)


def test_sample_and_label_drops_truncated_and_labels_by_gold(tmp_path):
    tok = train_tokenizer([f"the cat number {i} sat on a mat" for i in range(80)], 300, 1)
    model = build_model(
        ModelParams(d_model=32, n_layers=1, n_heads=2, context=64), 300, special_ids(tok), 0
    )
    samples, pairs = sample_and_label(
        model,
        plain_template(tok),
        ["the cat", "a mat"],
        k=6,
        max_new_tokens=8,
        temperature=1.0,
        gold=make_gold("length"),
        tau=0.0,
        seed=0,
    )
    assert len(samples) == 12
    ended = {(s["prompt"], s["response"]) for s in samples if s["ended_with_eos"]}
    for p in pairs:
        assert (p["prompt"], p["chosen"]) in ended and (p["prompt"], p["rejected"]) in ended
        assert p["gold_chosen"] > p["gold_rejected"] or p["p_chosen"] == 0.5


def test_asking_for_more_prompts_than_there_are_warns_and_reports_how_many(monkeypatch, caplog):
    """`preference.prompts` above the prepared data's RL prompts samples for all of them, says
    so with the params that give more, and records the count used."""
    asked = []

    def fake_sample_and_label(model, template, prompts, **kw):
        asked.append(list(prompts))
        samples = [{"ended_with_eos": True} for _ in range(len(prompts) * kw["k"])]
        return samples, [{"prompt": p} for p in prompts]

    monkeypatch.setattr(preferences, "sample_and_label", fake_sample_and_label)
    pcfg = PreferenceParams(prompts=5, samples_per_prompt=3)
    with caplog.at_level("WARNING", logger="lmpipe.reward.preferences"):
        _, stats = preferences.labelled_samples(
            torch.nn.Linear(1, 1), None, ["a", "b"], pcfg, make_gold("length"), 0, False
        )
    assert asked == [["a", "b"]] and stats["prompts"] == 2 and stats["samples"] == 6
    assert "preference.prompts = 5" in caplog.text and "data.rl_prompts_min" in caplog.text
    caplog.clear()
    pcfg = pcfg.model_copy(update={"prompts": 1})
    with caplog.at_level("WARNING", logger="lmpipe.reward.preferences"):
        _, stats = preferences.labelled_samples(
            torch.nn.Linear(1, 1), None, ["a", "b"], pcfg, make_gold("length"), 0, False
        )
    assert asked[-1] == ["a"] and stats["prompts"] == 1 and not caplog.text


def test_pair_metrics():
    m = pair_metrics(
        np.array([1.0, 0.0, 2.0]),
        np.array([0.0, 1.0, 1.0]),
        np.array([0.5, 0.5, 0.3]),
        np.array([0.0, 0.45, 0.6]),
    )
    assert m["val_accuracy"] == pytest.approx(2 / 3)
    # pair 2 has a gold gap under 0.1: left out; pair 3 is ordered against gold
    assert m["gold_order_pairs"] == 2 and m["gold_order_accuracy"] == 0.5


def test_calibration_error_is_zero_when_calibrated_and_large_when_overconfident():
    from lmpipe.reward.metrics import calibration_error

    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    calibrated = rng.uniform(0, 1, p.size) < p  # outcomes drawn with the predicted chance
    assert calibration_error(p, calibrated) < 0.01
    # overconfident: predicts 0.95 for outcomes that come 70% of the time
    y = rng.uniform(0, 1, 100_000) < 0.7
    assert calibration_error(np.full(y.size, 0.95), y) == pytest.approx(0.25, abs=0.01)
    # the order of a pair does not matter
    assert calibration_error(1 - p[:1000], ~calibrated[:1000]) == pytest.approx(
        calibration_error(p[:1000], calibrated[:1000])
    )
    assert np.isnan(calibration_error(np.array([]), np.array([])))


def test_pair_metrics_standard_errors_are_by_prompt():
    from lmpipe.stats import cluster_se

    x = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    # one observation per prompt: the usual s / sqrt(n)
    assert cluster_se(x, list("abcdef")) == pytest.approx(x.std(ddof=1) / np.sqrt(6))
    # each prompt's pairs repeated 5 times carry no more information than one of each
    assert cluster_se(np.repeat(x, 5), np.repeat(list("abcdef"), 5)) == pytest.approx(
        cluster_se(x, list("abcdef"))
    )
    assert np.isnan(cluster_se(x, ["a"] * 6))
    m = pair_metrics(
        np.array([1.0, 0.0, 2.0, 1.0]),
        np.array([0.0, 1.0, 1.0, 0.0]),
        np.array([0.5, 0.5, 0.3, 0.9]),
        np.array([0.0, 0.45, 0.6, 0.1]),
        prompts=["p", "p", "q", "r"],
    )
    assert m["val_prompts"] == 3 and m["gold_order_accuracy_se"] > 0 and m["val_accuracy_se"] > 0


def test_cluster_standard_error_covers_the_truth_over_seeds():
    """Pairs of one prompt share its difficulty: a 95% interval from the by-prompt SE covers the
    true accuracy about 95% of the time, where the naive per-pair SE covers it far less."""
    from lmpipe.stats import cluster_se

    covered = naive = 0
    seeds = 400
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        p = rng.beta(2, 1, size=60)  # each prompt's chance that a pair is ordered right
        y = (rng.random((60, 20)) < p[:, None]).ravel().astype(float)
        ids = np.repeat(np.arange(60), 20)
        se = cluster_se(y, ids)
        covered += abs(y.mean() - 2 / 3) < 1.96 * se
        naive += abs(y.mean() - 2 / 3) < 1.96 * y.std(ddof=1) / np.sqrt(y.size)
    assert 0.92 <= covered / seeds <= 0.98
    assert naive / seeds < 0.75


def test_bag_of_words_baseline_learns_a_lexical_preference():
    from lmpipe.reward.baseline import bag_of_words_baseline

    rng = np.random.default_rng(0)
    filler = ["the", "cat", "sat", "on", "a", "mat", "by", "door"]

    def row():
        good = " ".join(rng.choice(filler, 5)) + " happy"
        bad = " ".join(rng.choice(filler, 5)) + " sad"
        return {"chosen": good, "rejected": bad, "gold_chosen": 0.6, "gold_rejected": -0.5}

    train, val = [row() for _ in range(200)], [row() for _ in range(50)]
    m = bag_of_words_baseline(train, val)
    assert m["val_accuracy"] == 1.0 and m["gold_order_accuracy"] == 1.0
    # counted in other units: pieces that split the telling word apart ("hap"+"py" and "sad"
    # share nothing with the filler, so they still tell); a unit blind to it cannot
    split = bag_of_words_baseline(train, val, lambda t: [w[:3] for w in t.split()])
    assert split["gold_order_accuracy"] == 1.0
    blind = bag_of_words_baseline(train, val, lambda t: [w for w in t.split() if w in filler])
    assert blind["gold_order_accuracy"] <= 0.75


def test_bag_of_words_baseline_chooses_its_regularisation_on_held_out_prompts():
    """Few pairs, many words that tell nothing and labels that are often wrong: sklearn's default
    C = 1 fits the noise. The baseline picks its C by the held-out label loss of whole prompts,
    and orders val by gold far better than C = 1."""
    from lmpipe.reward.baseline import bag_of_words_baseline

    rng = np.random.default_rng(1)
    noise = [f"w{i}" for i in range(400)]

    def row(prompt):
        good, bad = [*rng.choice(noise, 6).tolist(), "glad"], rng.choice(noise, 6).tolist()
        if rng.random() < 0.3:  # the labeller got this pair wrong
            good, bad = bad, good
        gold = (0.5, -0.5) if "glad" in good else (-0.5, 0.5)
        return {
            "prompt": prompt,
            "chosen": " ".join(good),
            "rejected": " ".join(bad),
            "gold_chosen": gold[0],
            "gold_rejected": gold[1],
        }

    train = [row(f"p{i // 4}") for i in range(240)]
    val = [row(f"v{i // 4}") for i in range(400)]
    m = bag_of_words_baseline(train, val)
    cv = m["cv_log_loss"]
    assert list(cv) == sorted(cv) and m["C"] == min(cv, key=cv.get) and m["C"] < 1.0
    fixed = bag_of_words_baseline(train, val, c_grid=())  # no CV: sklearn's default C = 1
    assert fixed["C"] == 1.0 and fixed["cv_log_loss"] == {}
    assert m["gold_order_accuracy"] >= fixed["gold_order_accuracy"] + 0.1


def test_the_baselines_scorer_gives_its_val_margins():
    from lmpipe.reward.baseline import bag_of_words_baseline

    rng = np.random.default_rng(2)
    words = ["glad", "sad", "cat", "mat", "door", "sun"]

    def row(i):
        a, b = (" ".join(rng.choice(words, 4)) for _ in range(2))
        return {
            "prompt": f"p{i // 3}",
            "chosen": a,
            "rejected": b,
            "gold_chosen": 0.0,
            "gold_rejected": 0.0,
        }

    train, val = [row(i) for i in range(60)], [row(i) for i in range(60, 90)]
    m = bag_of_words_baseline(train, val)
    s = m["scorer"]
    np.testing.assert_allclose(
        s.score([p["chosen"] for p in val]) - s.score([p["rejected"] for p in val]), m["margin"]
    )


def test_cross_fitted_scores_ignore_the_labels_of_their_own_prompt():
    """A train response's cross-fitted score comes from folds without its prompt: flipping
    every label of one prompt moves the other prompts' scores, not that prompt's own."""
    from lmpipe.reward.baseline import cross_fitted_scores

    rng = np.random.default_rng(3)
    words = ["glad", "sad", "cat", "mat", "door", "sun", "hat", "joy"]

    def row(i):
        a = " ".join(rng.choice(words, 4)) + " glad"
        b = " ".join(rng.choice(words, 4))
        return {"prompt": f"p{i // 4}", "chosen": a, "rejected": b}

    train = [row(i) for i in range(120)]
    flipped = [
        {**p, "chosen": p["rejected"], "rejected": p["chosen"]} if p["prompt"] == "p0" else p
        for p in train
    ]
    before, after = cross_fitted_scores(train, 1.0), cross_fitted_scores(flipped, 1.0)
    assert set(before) == {(p["prompt"], p[s]) for p in train for s in ("chosen", "rejected")}
    own = [k for k in before if k[0] == "p0"]
    assert all(before[k] == pytest.approx(after[k], abs=1e-9) for k in own)
    moved = [k for k in before if k[0] != "p0" and abs(before[k] - after[k]) > 1e-6]
    assert moved  # the flipped labels do reach the other folds' models
    assert (
        np.mean(
            [
                before[("p1", p["chosen"])] > before[("p1", p["rejected"])]
                for p in train
                if p["prompt"] == "p1"
            ]
        )
        > 0.5
    )
    with pytest.raises(ValueError, match="at least 2 prompts"):
        cross_fitted_scores([{**p, "prompt": "one"} for p in train], 1.0)


def test_cv_log_loss_holds_out_whole_prompts_and_stops_once_a_weaker_penalty_does_worse():
    from lmpipe.reward.baseline import cv_log_loss

    groups = [f"p{i // 5}" for i in range(60)]
    x = np.arange(60, dtype=float)[:, None]  # each row's feature is its index
    seen: list[tuple[float, set]] = []
    loss_of_c = {0.1: 0.0, 0.3: 1.0, 1.0: -1.0, 3.0: 5.0}  # the weight w: held-out margins x·w

    def fit(x_train, c, start):
        seen.append((c, {groups[int(i)] for i in x_train[:, 0]}))
        return np.array([loss_of_c[c]])

    cv = cv_log_loss(x, groups, [3.0, 1.0, 0.3, 0.1], 3, fit)
    assert list(cv) == [0.1, 0.3, 1.0]  # 1.0 did worse than 0.3: 3.0 is never fitted
    assert cv[0.3] < cv[0.1] < cv[1.0]
    prompts = set(groups)
    for c in cv:
        trained = [g for cc, g in seen if cc == c]
        assert len(trained) == 3
        held = [prompts - g for g in trained]  # each fold holds out a third of the prompts whole
        assert all(len(h) == 4 for h in held) and set().union(*held) == prompts
    assert cv_log_loss(x[:5], groups[:5], [1.0], 3, fit) == {}  # one prompt: nothing to hold out


def test_held_out_metrics_fits_only_the_baselines_it_is_not_given(monkeypatch):
    """Benches that score several reward models on the same pairs fit each baseline once; the
    gap is then taken against the baseline they pass."""
    from types import SimpleNamespace

    from lmpipe.reward import evaluation

    fits = []

    def fake_baseline(train, val, tokenize=None):
        fits.append("tokens" if tokenize else "bow")
        return {
            "val_accuracy": 1.0,
            "gold_order_accuracy": 1.0,
            "C": 1.0,
            "margin": np.ones(len(val)),
        }

    n = 12
    monkeypatch.setattr(evaluation, "bag_of_words_baseline", fake_baseline)
    monkeypatch.setattr(evaluation, "encode_for_reward", lambda *a: [0])
    # the model orders every val pair as gold does (then one score per distinct response)
    monkeypatch.setattr(
        evaluation,
        "raw_scores",
        lambda m, seqs, pad: np.r_[np.ones(n), np.zeros(n), np.arange(len(seqs) - 2 * n)],
    )
    rows = [
        {"prompt": f"p{i // 3}", "chosen": f"good {i}", "rejected": f"bad {i}"}
        | {"gold_chosen": 1.0 + i, "gold_rejected": -1.0 - i}
        for i in range(n)
    ]
    encoded = {
        "train": [(None, r) for r in rows],
        "val": [(PreferenceExample([1], [2]), r) for r in rows],
    }
    template = SimpleNamespace(pad_id=0, tokenizer=None)

    fresh = evaluation.held_out_metrics(None, template, encoded, 8)
    assert fits == ["bow", "tokens"] and fresh["gold_order_gap_to_baseline"] == 0.0
    fits.clear()
    wrong = {"gold_order_accuracy": 0.0, "val_accuracy": 0.0, "C": 0.1, "margin": -np.ones(n)}
    given = evaluation.held_out_metrics(None, template, encoded, 8, {"bow": wrong})
    assert fits == ["tokens"]
    assert given["gold_order_gap_to_baseline"] == 1.0 and given["baseline_bow_C"] == 0.1


@pytest.mark.parametrize("pooling", ["last", "mean", "sum"])
def test_critic_from_the_reward_model_scores_each_partial_response(backbone, pooling):
    """PPO's critic copied from the reward model starts as the reward model's normalised score
    of the response so far, pooled the way the reward model pools: V_t (before response token
    t) = gain·raw(prompt + first t tokens) + bias. Mean pooling shrinks that toward the
    normalised mean 0 with n0 pseudo-tokens: exact as n0 → 0, 0 before the first token. Sum
    pooling adds the rest's expected raw score, which fades with n0: the same limits."""
    from lmpipe.rl.rollout import ValueModel
    from lmpipe.sampling import Generation

    model = build_reward_model(backbone, seed=1, pooling=pooling, response_token_id=3).eval()
    gain, bias = 1.7, -0.4
    value = ValueModel.from_reward_model(model, gain, bias)
    prompt, response = [1, 4, 3], [10, 11, 12, 13, 2]
    seq = torch.tensor([prompt + response])
    mask = torch.ones(1, len(response), dtype=torch.bool)
    gen = Generation(
        seq, torch.ones_like(seq), len(prompt), seq[:, len(prompt) :], mask, torch.tensor([True])
    )
    with torch.no_grad():
        if pooling != "last":
            assert float(value(gen, slice(None))[0, 0]) == pytest.approx(0.0, abs=1e-6)
            value.log_n0.fill_(math.log(1e-6))
        v = value(gen, slice(None))[0]
    first = 0 if pooling == "last" else 1  # a pooled score of an empty response is undefined
    want = [
        gain * raw_scores(model, [prompt + response[:t]], 0)[0] + bias
        for t in range(first, len(response))
    ]
    np.testing.assert_allclose(v[first:].numpy(), want, rtol=1e-4, atol=1e-4)


def test_sample_gold_order_counts_pairs_within_a_prompt():
    """Pairs are formed within a prompt only; gold gaps under 0.1 and unscored (NaN) samples
    are left out."""
    from lmpipe.stats import sample_gold_order

    scores = np.array([0.0, 1.0, 2.0, np.nan, 5.0, 4.0])
    gold = np.array([0.0, 0.5, 0.2, 0.9, 0.0, 0.05])
    got = sample_gold_order(scores, gold, [0, 0, 0, 0, 1, 1])
    # prompt 0: (0,1) agree, (0,2) agree, (1,2) disagree; sample 3 has no score; prompt 1's
    # one pair has a gold gap of 0.05: out
    assert got["pairs"] == 3 and got["accuracy"] == pytest.approx(2 / 3)
    assert np.isnan(sample_gold_order(scores[:1], gold[:1], [0])["accuracy"])
