"""RL under torchrun: two gloo processes take the same steps as one process (the same rollouts,
the update split by prompt groups and summed), for PPO, RLOO and DPG."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from test_rl_toy import make_models, trainer

STEPS = 3
KEYS = ("rl/score", "rl/kl", "rl/kl_k3", "rl/entropy", "rl/policy_loss", "rl/beta")


def steps(algo: str) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    torch.manual_seed(0)
    policy, ref = make_models()
    # 2 prompts x 4 samples; a minibatch of 8 gives each of 2 ranks one prompt group
    t = trainer(algo, policy, ref, samples_per_prompt=4, minibatch_size=8, ppo={"epochs": 2})
    metrics = [t.train_step() for _ in range(STEPS)]
    return {k: v.detach().clone() for k, v in t.policy.state_dict().items()}, metrics


def worker(rank: int, world: int, init: str, algo: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        state, metrics = steps(algo)
        if rank == 0:
            torch.save({"state": state, "metrics": metrics}, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("algo", ["ppo", "rloo", "dpg"])
def test_two_processes_take_the_steps_of_one(algo, tmp_path, monkeypatch):
    one_state, one_metrics = steps(algo)
    out = tmp_path / "ddp.pt"
    init = f"file://{tmp_path / 'rendezvous'}"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the two workers on a shared machine
    mp.spawn(worker, args=(2, init, algo, str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    for key, value in one_state.items():
        torch.testing.assert_close(ddp["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for a, b in zip(ddp["metrics"], one_metrics, strict=True):
        for key in KEYS:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert np.isfinite(one_metrics[-1]["rl/kl"])
