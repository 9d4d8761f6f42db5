"""FSDP2 sharding (`sharding: fsdp`) on CPU with gloo: two sharded processes train like one
process at the same global batch, save the same model folder, and resume on any number of
processes."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmpipe import shard
from lmpipe.batches import TokenWindows
from lmpipe.checkpoints import CheckpointStore
from lmpipe.config import PretrainParams, RLParams
from lmpipe.rl.loop import RLTrainer
from lmpipe.rl.rollout import ValueModel
from lmpipe.train import train
from test_train import tiny_model

GLOBAL_BATCH = 8
TOKENS = np.random.default_rng(0).integers(3, 50, 4000).astype(np.int64)


def cfg(**kw) -> PretrainParams:
    base = dict(
        max_steps=4,
        warmup_steps=1,
        batch_size=GLOBAL_BATCH,
        eval_every=2,
        log_every=1,
        checkpoint_every=2,
        precision="fp32",
        lr=3e-3,
        sharding="fsdp",
    )
    return PretrainParams(**{**base, **kw})


def fit(rank: int, world: int, store: CheckpointStore, stop_after=None, **kw):
    torch.manual_seed(0)
    model = tiny_model(0)
    c = cfg(batch_size=GLOBAL_BATCH // world, **kw)
    source = TokenWindows(TOKENS, 16, c.batch_size, 0, rank, world)
    val = TokenWindows(TOKENS, 16, GLOBAL_BATCH, 0).fixed_batches(2)
    result = train(model, source, c, val_batches=val, checkpoints=store, stop_after=stop_after)
    return model, result


def worker(rank: int, world: int, init: str, tmp: str, kw: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        store = CheckpointStore(Path(tmp) / "ck")
        stop = kw.pop("stop_after", None)
        model, result = fit(rank, world, store, stop, **kw)
        plain = all(not isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
        torch.save(
            {
                "state": model.state_dict(),
                "history": result.history,
                "plain": plain,
                "device": str(next(model.parameters()).device),
            },
            f"{tmp}/rank{rank}.pt",
        )
        if rank == 0:
            model.save_pretrained(f"{tmp}/saved", safe_serialization=True)
    finally:
        torch.distributed.destroy_process_group()


def spawn(tmp_path, monkeypatch, **kw) -> list[dict]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the two workers on a shared machine
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(worker, args=(2, init, str(tmp_path), kw), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_two_sharded_processes_train_like_one_and_save_the_same_folder(tmp_path, monkeypatch):
    one, one_result = fit(0, 1, CheckpointStore(tmp_path / "one-ck"), keep_best=True)
    one.save_pretrained(tmp_path / "one", safe_serialization=True)
    (tmp_path / "fsdp").mkdir()
    ranks = spawn(tmp_path / "fsdp", monkeypatch, keep_best=True)
    for r in ranks:  # every rank ends with the whole model, a plain module on its device
        assert r["plain"] and r["device"] == "cpu"
        for key, value in one.state_dict().items():
            torch.testing.assert_close(r["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    losses = [
        [h.get("train/loss") for h in run] for run in (ranks[0]["history"], one_result.history)
    ]
    np.testing.assert_allclose(*losses, rtol=1e-4)
    # the saved folder: the same tensors under the same names, loadable with transformers
    a, b = (
        load_file(tmp_path / "fsdp/saved/model.safetensors"),
        load_file(tmp_path / "one/model.safetensors"),
    )
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {
        k: (v.shape, v.dtype) for k, v in b.items()
    }
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp/saved")
    torch.testing.assert_close(
        loaded.state_dict()["model.norm.weight"],
        one.state_dict()["model.norm.weight"],
        rtol=1e-4,
        atol=1e-5,
    )
    # the checkpoint holds the whole state under the model's own names, on rank 0
    ck = torch.load(tmp_path / "fsdp/ck/checkpoint.pt", weights_only=True)
    assert set(ck["model"]) == set(one.state_dict())
    assert ck["step"] == 4


def test_a_sharded_checkpoint_resumes_in_one_process(tmp_path, monkeypatch):
    spawn(tmp_path, monkeypatch, stop_after=2)
    store = CheckpointStore(tmp_path / "ck")
    assert torch.load(store.path, weights_only=True)["step"] == 2
    resumed, result = fit(0, 1, store)
    assert result.resumed_from == 2
    straight, _ = fit(0, 1, CheckpointStore(tmp_path / "straight"))
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_blocks_are_the_models_own_unit():
    assert shard.block_classes(tiny_model(0)) == {"LlamaDecoderLayer"}
    assert not shard.enabled("fsdp")  # one process, no group: nothing to divide


@pytest.mark.parametrize("bad", ["zero3", "FSDP", ""])
def test_sharding_is_none_or_fsdp(bad):
    from lmpipe.config import ParamsError, parse_section

    with pytest.raises(ParamsError, match="sharding"):
        parse_section("sft", {"sharding": bad})


RL_KEYS = ("rl/score", "rl/kl", "rl/entropy", "rl/policy_loss", "rl/value_loss", "rl/grad_norm")
RL_KEYS += ("rl/kl_p_pi", "rl/proposal_swaps")


def rl_steps(algo: str, **kw):
    """Two steps on the toy problem; PPO's critic is mean-pooled (its scalar parameters stay
    whole under FSDP), DPG checks its proposal at the second step (after one small step the
    check is a near tie, which rounding alone can tip)."""
    from test_rl_toy import EOS, PAD, PROMPTS, make_models, score_fn

    torch.manual_seed(0)
    policy, ref = make_models()
    # 2 prompts x 4 samples; a minibatch of 8 gives each of 2 ranks one prompt group
    cfg = RLParams(
        algo=algo,
        prompts_per_step=2,
        samples_per_prompt=4,
        minibatch_size=8,
        max_new_tokens=3,
        precision="fp32",
        ppo={"epochs": 2},
        dpg={"swap_every": 2},
        **kw,
    )
    value = None
    if algo == "ppo":
        head = torch.nn.Linear(policy.config.hidden_size, 1)
        value = ValueModel(copy.deepcopy(policy.base_model), head, "mean")
    t = RLTrainer(
        policy, ref, cfg, PROMPTS, score_fn, eos_id=EOS, pad_id=PAD, seed=0, value_model=value
    )
    metrics = [t.train_step() for _ in range(2)]
    return t, metrics


def rl_worker(rank: int, world: int, init: str, algo: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        t, metrics = rl_steps(algo, sharding="fsdp")
        state = t.state_dict()  # every rank: the optimizer's state is gathered to rank 0
        if rank == 0:
            torch.save({"trainer": state, "metrics": metrics}, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("algo", ["ppo", "rloo", "dpg"])
def test_rl_two_sharded_processes_take_the_steps_of_one(algo, tmp_path, monkeypatch):
    one, one_metrics = rl_steps(algo)
    out = tmp_path / "fsdp.pt"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(rl_worker, args=(2, init, algo, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    for key, value in one.policy.state_dict().items():
        torch.testing.assert_close(got["trainer"]["policy"][key], value, rtol=1e-4, atol=1e-5)
    for a, b in zip(got["metrics"], one_metrics, strict=True):
        for key in RL_KEYS:
            # the swap check ends the last step: it compares two KL estimates close enough for
            # rounding to tip, and what it decides has not yet moved anything
            if key in b and key != "rl/proposal_swaps":
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    # the sharded run's checkpoint resumes in one process (with sharding: fsdp, names as keys)
    resumed, _ = rl_steps(algo, sharding="fsdp")
    resumed.load_state_dict(got["trainer"])
    assert resumed.step == 2


def placed_rollout(ref_device: str, policy_device: str = "cpu"):
    from lmpipe.dist import place
    from test_rl_toy import make_models, trainer

    torch.manual_seed(0)
    policy, ref = make_models()
    device = torch.device(policy_device)
    ref = ref.to(place("rl.reference_device", ref_device, device))
    t = trainer("ppo", policy.to(device), ref, samples_per_prompt=4, minibatch_size=8)
    return t.rollout()


def test_a_reference_placed_apart_gives_the_same_rollout():
    """On this CPU the reference's own device is the policy's: the pass that moves a batch to
    another device and back (`lmpipe.logprobs._elsewhere`) is checked against the direct one."""
    from lmpipe import logprobs

    auto, placed = placed_rollout("auto"), placed_rollout("cpu")
    torch.testing.assert_close(placed.scores, auto.scores, rtol=0, atol=0)
    torch.testing.assert_close(placed.ref_logp, auto.ref_logp, rtol=0, atol=0)
    from test_rl_toy import make_models

    _, ref = make_models()
    rows = torch.arange(4)
    direct = logprobs.response_logprobs(ref, auto.gen, rows, 1.0)
    moved = logprobs._elsewhere(ref, auto.gen, rows, torch.device("cpu"), 1.0, True, True)
    for a, b in zip(direct, moved, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_placement_on_a_missing_gpu_says_what_to_fix():
    from lmpipe.config import ParamsError, RLParams
    from lmpipe.dist import place

    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    with pytest.raises(ParamsError, match="rl.reward_device = 'cuda:1'"):
        place("rl.reward_device", "cuda:1", torch.device("cpu"))
    with pytest.raises(ValueError, match="reference_device"):
        RLParams(reference_device="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_reference_on_the_cpu_scores_a_cuda_rollout_alike():
    on_gpu, apart = placed_rollout("auto", "cuda"), placed_rollout("cpu", "cuda")
    torch.testing.assert_close(apart.scores, on_gpu.scores)
    torch.testing.assert_close(apart.ref_logp, on_gpu.ref_logp, rtol=1e-4, atol=1e-5)
