"""RL under torchrun: two gloo processes take the same steps as one process (each rank samples
its prompt groups and the ranks gather them into the same rollouts, token for token; the update
split by prompt groups and summed), for PPO, RLOO and DPG."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from test_rl_toy import make_models, trainer

STEPS = 3
KEYS = ("rl/score", "rl/kl", "rl/kl_k3", "rl/entropy", "rl/policy_loss", "rl/beta")


ROLLOUT = ("sequences", "attention_mask", "response", "response_mask", "ended")


def steps(algo: str) -> tuple[dict[str, torch.Tensor], list[dict[str, float]], list[dict]]:
    torch.manual_seed(0)
    policy, ref = make_models()
    # 2 prompts x 4 samples; a minibatch of 8 gives each of 2 ranks one prompt group
    t = trainer(algo, policy, ref, samples_per_prompt=4, minibatch_size=8, ppo={"epochs": 2})
    rollouts, rollout = [], t.rollout

    def spy():
        ro = rollout()
        rollouts.append(
            {
                **{key: getattr(ro.gen, key).clone() for key in ROLLOUT},
                "prompt_index": ro.prompt_index.clone(),
                "scores": ro.scores.clone(),
                "proxy": ro.proxy.clone(),
                "ref_logp": ro.ref_logp.clone(),
            }
        )
        return ro

    t.rollout = spy
    metrics = [t.train_step() for _ in range(STEPS)]
    state = {k: v.detach().clone() for k, v in t.policy.state_dict().items()}
    return state, metrics, rollouts


def worker(rank: int, world: int, init: str, algo: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        state, metrics, rollouts = steps(algo)
        torch.save({"state": state, "metrics": metrics, "rollouts": rollouts}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("algo", ["ppo", "rloo", "dpg"])
def test_two_processes_take_the_steps_of_one(algo, tmp_path, monkeypatch):
    one_state, one_metrics, one_rollouts = steps(algo)
    out = tmp_path / "ddp.pt"
    init = f"file://{tmp_path / 'rendezvous'}"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the two workers on a shared machine
    mp.spawn(worker, args=(2, init, algo, str(out)), nprocs=2, join=True)
    ddp, other = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    # every rank holds one process's rollouts: the same tokens and scores, exactly (fp32)
    assert len(one_rollouts) == STEPS
    for rollouts in (ddp["rollouts"], other["rollouts"]):
        for a, b in zip(rollouts, one_rollouts, strict=True):
            for key in (*ROLLOUT, "prompt_index", "scores"):
                assert torch.equal(a[key], b[key]), key
            torch.testing.assert_close(a["proxy"], b["proxy"], equal_nan=True, rtol=0, atol=0)
            torch.testing.assert_close(a["ref_logp"], b["ref_logp"], rtol=1e-5, atol=1e-6)
    lengths = {tuple(r["response_mask"].sum(-1).tolist()) for r in one_rollouts}
    assert len(lengths) > 1  # the steps drew different responses
    for key, value in one_state.items():
        torch.testing.assert_close(ddp["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for a, b in zip(ddp["metrics"], one_metrics, strict=True):
        for key in KEYS:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert np.isfinite(one_metrics[-1]["rl/kl"])
