"""The training loop on toy models: schedule, accumulation, learning, resume, NaN guard."""

import itertools
import math

import numpy as np
import pytest
import torch

from lmpipe.batches import IGNORE, Batch, Parts, TokenWindows
from lmpipe.checkpoints import CheckpointStore
from lmpipe.config import ModelParams, PretrainParams
from lmpipe.model import build_model
from lmpipe.optim import lr_at, param_groups
from lmpipe.precision import use_bf16
from lmpipe.train import TrainingDiverged, lm_loss_sum, train

SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2}
TINY = ModelParams(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, context=16)


def tiny_model(seed=0, arch="llama"):
    return build_model(
        TINY.model_copy(update={"arch": arch, "n_kv_heads": 0 if arch == "gpt2" else 1}),
        50,
        SPECIAL,
        seed,
    )


def cfg(**kw):
    base = dict(
        max_steps=20,
        warmup_steps=2,
        batch_size=4,
        eval_every=10,
        log_every=1,
        checkpoint_every=0,
        precision="fp32",
        lr=3e-3,
    )
    return PretrainParams(**{**base, **kw})


def test_schedule_warmup_then_cosine_to_floor():
    c = PretrainParams(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.55)  # half way: floor + (1 - floor) / 2
    assert lr_at(110, c) == pytest.approx(0.1)
    assert lr_at(500, c) == pytest.approx(0.1)
    lrs = [lr_at(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_no_weight_decay_on_norms_and_biases():
    m = build_model(TINY.model_copy(update={"arch": "gpt2", "n_kv_heads": 0}), 50, SPECIAL, 0)
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    names = {id(p): n for n, p in m.named_parameters()}
    assert any("ln" in names[id(p)] for p in no_decay["params"])
    assert any("bias" in names[id(p)] for p in no_decay["params"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_loss_decreases_on_a_memorisable_batch(precision):
    torch.manual_seed(0)
    m = tiny_model()
    tokens = np.tile(np.arange(3, 20, dtype=np.uint16), 20)  # a repeating sequence
    src = TokenWindows(tokens, 16, 4, seed=0)
    c = cfg(max_steps=80, lr=1e-2, precision=precision)
    res = train(m, src, c, val_batches=src.fixed_batches(1))
    losses = [r["train/loss"] for r in res.history]
    assert losses[0] > math.log(17)  # starts near uniform over the tokens seen
    assert losses[-1] < 0.2 * losses[0]
    assert res.val_loss < 0.5
    assert all(p.dtype == torch.float32 for p in m.parameters())  # bf16 autocasts, never casts


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "want"),
    [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
)
def test_auto_precision_follows_the_cpu(monkeypatch, amx, avx512_bf16, want):
    # bf16 only where the CPU has native bf16 matmuls: AVX2-only CPUs emulate it, 30x slower.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    cpu = torch.device("cpu")
    assert use_bf16("auto", cpu) is want
    assert use_bf16("fp32", cpu) is False
    assert use_bf16("bf16", cpu) is True


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    ids = torch.randint(3, 50, (8, 17))
    labels = ids[:, 1:].clone()
    labels[:3, :5] = IGNORE  # uneven numbers of targets per micro-batch
    big = Batch(ids[:, :-1], labels)
    m1, m2 = tiny_model(), tiny_model()
    (lm_loss_sum(m1, big) / big.n_targets).backward()
    micro = [Batch(ids[i : i + 2, :-1], labels[i : i + 2]) for i in range(0, 8, 2)]
    total = sum(b.n_targets for b in micro)
    for b in micro:
        (lm_loss_sum(m2, b) / total).backward()
    torch.testing.assert_close(grads(m1), grads(m2), rtol=1e-5, atol=1e-7)


def test_accumulation_in_the_loop_matches_bigger_batch():
    tokens = np.random.default_rng(0).integers(3, 50, 5000).astype(np.uint16)
    a, b = tiny_model(), tiny_model()
    ra = train(a, TokenWindows(tokens, 16, 8, seed=1), cfg(max_steps=5), val_batches=[])

    # the same windows as 4 micro-batches of 2
    class Grouped:
        """Draw a batch of 8 windows and serve it as 4 micro-batches of 2."""

        def __init__(self):
            self.big = TokenWindows(tokens, 16, 8, seed=1)
            self.queue = []

        def next_batch(self):
            if not self.queue:
                bb = self.big.next_batch()
                self.queue = [
                    Batch(bb.input_ids[i : i + 2], bb.labels[i : i + 2]) for i in range(0, 8, 2)
                ]
            return self.queue.pop(0)

        def state_dict(self):
            return {}

        def load_state_dict(self, s):
            pass

    rb = train(b, Grouped(), cfg(max_steps=5, batch_size=2, grad_accum=4), val_batches=[])
    la = [r["train/loss"] for r in ra.history]
    lb = [r["train/loss"] for r in rb.history]
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=2e-5)  # Adam: 5 steps, float order


def test_parts_train_like_one_padded_batch():
    """A micro-batch of `Parts` (two widths, each run alone) steps like the same rows padded
    to one width with IGNORE targets: same losses, same weights."""
    tokens = np.random.default_rng(0).integers(3, 50, 5000).astype(np.uint16)

    class Source:
        def __init__(self, padded: bool):
            self.windows, self.short = (
                TokenWindows(tokens, 16, 3, seed=1),
                TokenWindows(tokens, 6, 2, seed=2),
            )
            self.padded = padded

        def next_batch(self):
            w, s = self.windows.next_batch(), self.short.next_batch()
            if not self.padded:
                return Parts((w, s))
            pad = torch.nn.functional.pad
            return Batch(
                torch.cat([w.input_ids, pad(s.input_ids, (0, 10), value=0)]),
                torch.cat([w.labels, pad(s.labels, (0, 10), value=IGNORE)]),
            )

        def state_dict(self):
            return {}

        def load_state_dict(self, s):
            pass

    a, b = tiny_model(), tiny_model()
    ra = train(a, Source(padded=True), cfg(max_steps=4), val_batches=[])
    rb = train(b, Source(padded=False), cfg(max_steps=4), val_batches=[])
    np.testing.assert_allclose(
        [r["train/loss"] for r in ra.history], [r["train/loss"] for r in rb.history], rtol=1e-5
    )
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_resume_is_bit_identical(tmp_path, arch):
    tokens = np.random.default_rng(0).integers(3, 50, 5000).astype(np.uint16)
    c = cfg(max_steps=12, checkpoint_every=4)
    straight = tiny_model(arch=arch)
    train(straight, TokenWindows(tokens, 16, 4, seed=3), c, val_batches=[])

    store = CheckpointStore(tmp_path / "ck")
    first = tiny_model(arch=arch)
    train(
        first,
        TokenWindows(tokens, 16, 4, seed=3),
        c,
        val_batches=[],
        checkpoints=store,
        stop_after=6,
    )
    assert torch.load(store.path, weights_only=True)["step"] == 4  # the last checkpoint
    resumed = tiny_model(arch=arch)  # a fresh process: new model, new sampler
    res = train(resumed, TokenWindows(tokens, 16, 4, seed=3), c, val_batches=[], checkpoints=store)
    assert res.resumed_from == 4
    for (n, pa), pb in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), f"{n} differs after resume"


def test_keep_best_ends_with_the_weights_of_the_lowest_eval_loss(tmp_path):
    """A run that over-fits: the val loss rises after its best evaluation; keep_best ends on
    the best weights (bit-identical to a run stopped there), also across a resume."""
    tokens = np.random.default_rng(0).integers(3, 50, 4000).astype(np.uint16)
    val = TokenWindows(
        np.random.default_rng(1).integers(3, 50, 800).astype(np.uint16), 16, 4, 0
    ).fixed_batches(2)
    c = cfg(max_steps=30, eval_every=5, lr=3e-2, min_lr_ratio=1.0, keep_best=True)
    plain = tiny_model()
    res_plain = train(
        plain,
        TokenWindows(tokens[:200], 16, 4, seed=3),
        c.model_copy(update={"keep_best": False}),
        val_batches=val,
    )
    evals = [(r["step"], r["eval/loss"]) for r in res_plain.history if "eval/loss" in r]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert best_step < 30 and evals[-1][1] > best_loss  # it over-fit the 200 tokens

    kept = tiny_model()
    res = train(kept, TokenWindows(tokens[:200], 16, 4, seed=3), c, val_batches=val)
    assert res.kept_step == best_step and res.val_loss == best_loss
    stopped = tiny_model()
    train(
        stopped,
        TokenWindows(tokens[:200], 16, 4, seed=3),
        c.model_copy(update={"max_steps": 30, "keep_best": False}),
        val_batches=val,
        stop_after=best_step,
    )
    for pa, pb in zip(kept.state_dict().values(), stopped.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)

    store = CheckpointStore(tmp_path / "ck")
    c_ck = c.model_copy(update={"checkpoint_every": 5})
    train(
        tiny_model(),
        TokenWindows(tokens[:200], 16, 4, seed=3),
        c_ck,
        val_batches=val,
        checkpoints=store,
        stop_after=best_step + 6,
    )
    resumed = tiny_model()
    res = train(
        resumed, TokenWindows(tokens[:200], 16, 4, seed=3), c_ck, val_batches=val, checkpoints=store
    )
    assert res.resumed_from > best_step and res.kept_step == best_step
    for pa, pb in zip(kept.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)


def test_corrupt_checkpoint_is_ignored(tmp_path):
    store = CheckpointStore(tmp_path)
    store.path.write_bytes(b"not a checkpoint")
    assert store.load() is None


def test_nan_loss_stops_with_step_and_advice():
    m = tiny_model()
    with torch.no_grad():
        m.get_input_embeddings().weight.fill_(float("nan"))
    tokens = np.random.default_rng(0).integers(3, 50, 500).astype(np.uint16)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 0 \(lr .*\)\. Try a lower lr"):
        train(m, TokenWindows(tokens, 16, 2, seed=0), cfg(), val_batches=[])


def test_token_windows_ranks_partition_the_global_batch():
    tokens = np.arange(1000, dtype=np.uint16)
    whole = TokenWindows(tokens, 8, 6, seed=5).next_batch()
    parts = [TokenWindows(tokens, 8, 3, seed=5, rank=r, world=2).next_batch() for r in (0, 1)]
    torch.testing.assert_close(torch.cat([p.input_ids for p in parts]), whole.input_ids)
    assert torch.equal(whole.labels[:, :-1], whole.input_ids[:, 1:])
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenWindows(tokens[:5], 8, 2, seed=0)


def test_checkpoint_key_changes_with_params_and_input_content(tmp_path):
    from lmpipe import stage
    from lmpipe.checkpoints import checkpoint_store
    from lmpipe.config import Params, TrackingParams

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.bin").write_bytes(b"\x01\x02")

    def store(lr=1e-3, seed=1, exp="a"):
        p = Params(
            seed=seed,
            sections={
                "pretrain": PretrainParams(lr=lr),
                "tracking": TrackingParams(experiment=exp),
            },
        )
        return checkpoint_store(
            tmp_path / "ck", "pretrain", stage.checkpoint_key(p, {"data": data})
        )

    base = store().directory
    assert store().directory == base
    assert store(exp="other").directory == base  # tracking settings do not change results
    assert store(lr=2e-3).directory != base
    assert store(seed=2).directory != base
    (data / "train.bin").write_bytes(b"\x01\x03")
    assert store().directory != base


def test_progress_in_a_log_is_plain_lines_at_the_interval(caplog):
    from lmpipe.progress import Progress

    with caplog.at_level("INFO", logger="lmpipe.progress"):
        bar = Progress(4, "train", terminal=False, every_s=0.0)
        for i in range(4):
            bar.update(1, loss=f"{1.0 / (i + 1):.2f}")
        quiet = Progress(4, "rl", terminal=False, every_s=3600.0)
        quiet.update(2)
        off = Progress(4, "rank 1", terminal=False, every_s=0.0, enabled=False)
        off.update(2)
    lines = [r.getMessage() for r in caplog.records]
    # every update but the last (the stage's own lines report the end)
    assert [line.split(",")[0] for line in lines] == [
        "train 1/4 (25%)",
        "train 2/4 (50%)",
        "train 3/4 (75%)",
    ]
    assert "loss 0.33" in lines[-1] and "left" in lines[-1]
