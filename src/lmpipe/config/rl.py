"""The RL section and its per-algorithm subsections `rl.ppo` and `rl.dpg` (stage: rl)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from lmpipe.config.base import DEVICE, CheckpointEvery, Device, GradClip, Section, Sharding


class PPOParams(Section):
    """PPO's own settings: GAE advantages, the clipped surrogate and the critic (rl.algo: ppo)."""

    epochs: int = Field(2, ge=1, description="passes over each rollout batch")
    clip: float = Field(0.2, gt=0, description="policy ratio clip epsilon")
    value_clip: float = Field(0.2, gt=0, description="value clip around the old value")
    vf_coef: float = Field(0.1, ge=0, description="value loss coefficient")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    whiten_rewards: bool = Field(False, description="scale per-token rewards per batch")
    whiten_advantages: bool = Field(True, description="whiten advantages per batch")
    value_init: Literal["reward", "zero"] = Field(
        "reward", description="critic from the reward model, or policy backbone + zero head"
    )
    critic_warmup_steps: int = Field(0, ge=0, description="first steps update the critic only")
    critic_lr: float | None = Field(
        None,
        gt=0,
        le=1,
        description="the critic's peak learning rate (null = rl.lr), same schedule",
    )


class DPGParams(Section):
    """DPG's own settings: the proposal q that samples toward p = pi0*exp(r/beta) (rl.algo: dpg)."""

    swap_every: int = Field(4, ge=1, description="steps between checks that replace q by pi")


class RLParams(Section):
    """KL-regularised RL from the SFT model toward the normalised reward (stage: rl)."""

    moved: ClassVar[dict[str, str]] = {
        "ppo_epochs": "ppo.epochs",
        "clip": "ppo.clip",
        "value_clip": "ppo.value_clip",
        "vf_coef": "ppo.vf_coef",
        "gamma": "ppo.gamma",
        "lam": "ppo.lam",
        "whiten_rewards": "ppo.whiten_rewards",
        "whiten_advantages": "ppo.whiten_advantages",
        "value_init": "ppo.value_init",
        "critic_warmup_steps": "ppo.critic_warmup_steps",
        "dpg_swap_every": "dpg.swap_every",
    }
    """Keys that belong to one algorithm's subsection: the error names the new key."""

    algo: Literal["ppo", "rloo", "dpg"] = Field(
        "ppo", description="ppo (GAE, clipped surrogate), rloo (leave-one-out REINFORCE), dpg"
    )
    kl_coef: float = Field(0.2, gt=0, description="beta of the KL penalty / posterior temperature")
    adaptive_kl: bool = Field(False, description="adapt beta toward kl_target (Ziegler et al.)")
    kl_target: float = Field(6.0, gt=0, description="adaptive: target KL in nats per sequence")
    kl_horizon: float = Field(10000.0, gt=0, description="adaptive: horizon in episodes")
    steps: int = Field(40, ge=1, description="rollout batches (each followed by updates)")
    prompts_per_step: int = Field(32, ge=1, description="prompts per rollout batch")
    samples_per_prompt: int = Field(
        2, ge=1, description="responses per prompt (rloo and dpg need >= 2)"
    )
    max_new_tokens: int = Field(48, ge=1, description="response length limit")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (all log-probs use it)")
    missing_eos_penalty: float | None = Field(
        -2.0,
        description="score of a response that hits the length limit without EOS (null = RM's)",
    )
    lr: float = Field(
        1e-4,
        gt=0,
        le=1,
        description="Adam learning rate (the policy; the critic too unless rl.ppo.critic_lr)",
    )
    lr_schedule: Literal["linear", "constant"] = Field(
        "linear", description="linear: decay to 0 over rl.steps (as TRL's default); constant"
    )
    warmup_steps: int = Field(
        0,
        ge=0,
        description="steps of linear warmup to rl.lr before the schedule (0 = none)",
    )
    adam_eps: float = Field(1e-5, gt=0, description="Adam epsilon")
    grad_clip: GradClip = 1.0
    minibatch_size: int = Field(32, ge=1, description="sequences per minibatch / forward chunk")
    ppo: PPOParams = Field(default_factory=PPOParams, description=PPOParams.__doc__)
    dpg: DPGParams = Field(default_factory=DPGParams, description=DPGParams.__doc__)
    eval_prompts: int = Field(32, ge=1, description="held-out prompts for the final evaluation")
    eval_samples: int = Field(8, ge=1, description="policy samples per eval prompt")
    posterior_samples: int = Field(
        64, ge=2, description="pi0 samples per eval prompt for log Z (N)"
    )
    log_every: int = Field(1, ge=1, description="steps between logged metrics")
    checkpoint_every: CheckpointEvery = 20
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="log-prob/value/update passes; auto: bf16 where training uses it; "
        "sampling and diagnostics fp32",
    )
    device: Device = "auto"
    sharding: Sharding = "none"
    reference_device: str = Field(
        "auto", description="the frozen reference's device: auto (the policy's), cpu, cuda:N"
    )
    reward_device: str = Field(
        "auto", description="the reward model's device: auto (the policy's), cpu, cuda:N"
    )

    @field_validator("reference_device", "reward_device")
    @classmethod
    def _placement(cls, v: str) -> str:
        if not DEVICE.fullmatch(v):
            raise ValueError("use auto (the policy's device), cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _check(self) -> RLParams:
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"rl.warmup_steps ({self.warmup_steps}) must be below rl.steps ({self.steps})"
            )
        if self.algo in ("rloo", "dpg") and self.samples_per_prompt < 2:
            raise ValueError(f"rl.algo {self.algo!r} needs rl.samples_per_prompt >= 2")
        if self.sharding == "fsdp" and self.samples_per_prompt < 2:
            # ranks run their passes in step: each on whole prompt groups, each prompt once
            raise ValueError("rl.sharding 'fsdp' needs rl.samples_per_prompt >= 2")
        if self.sharding == "fsdp" and self.minibatch_size % self.samples_per_prompt:
            raise ValueError(
                "rl.sharding 'fsdp' needs rl.minibatch_size to be a multiple of "
                "rl.samples_per_prompt (whole prompt groups per rank)"
            )
        return self
