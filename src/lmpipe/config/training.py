"""Sections of the training loop and the stages that run it: pretrain, SFT, the preference
pairs and the reward model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmpipe.config.base import (
    CheckpointEvery,
    Device,
    EvalEvery,
    GradClip,
    LearningRate,
    OptimizerSteps,
    Precision,
    Section,
    Sharding,
    WarmupSteps,
    WeightDecay,
)


class TrainParams(Section):
    """Fields shared by every run of the training loop (pretrain, SFT, distillation)."""

    lr: LearningRate = 2e-3
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: WarmupSteps = 20
    max_steps: OptimizerSteps = 160
    batch_size: int = Field(32, ge=1, description="sequences per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    weight_decay: WeightDecay = 0.1
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: GradClip = 1.0
    eval_every: EvalEvery = 40
    eval_batches: int = Field(8, ge=1, description="fixed val batches per evaluation")
    log_every: int = Field(10, ge=1, description="steps between logged training metrics")
    checkpoint_every: CheckpointEvery = 40
    keep_best: bool = Field(
        False, description="end with the weights of the evaluation with the lowest val loss"
    )
    precision: Precision = "auto"
    compile: bool = Field(False, description="torch.compile the model")
    device: Device = "auto"
    sharding: Sharding = "none"
    peak_tflops: float = Field(0.0, ge=0, description="for train/mfu; 0 = known GPU table or none")


class PretrainParams(TrainParams):
    """Next-token training on the prepared tokens, from scratch or the base (stage: pretrain)."""

    max_steps: int = Field(
        160, ge=0, description="optimizer steps (0: with a base model, pass it through unchanged)"
    )


class SftParams(TrainParams):
    """Supervised fine-tuning on prompt/response pairs, loss on the response (stage: sft)."""

    lr: LearningRate = 5e-4
    warmup_steps: WarmupSteps = 10
    max_steps: OptimizerSteps = 100
    weight_decay: WeightDecay = 0.0
    eval_every: EvalEvery = 25
    checkpoint_every: CheckpointEvery = 50
    max_new_tokens: int = Field(48, ge=1, description="sampled response length for the EOS report")
    samples: int = Field(64, ge=1, description="eval prompts sampled after training")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of those samples")


class PreferenceParams(Section):
    """Preference pairs for the reward model, labelled by a gold scorer or read (stage: reward)."""

    source: Literal["gold", "file"] = Field(
        "gold", description="gold: SFT samples labelled by the gold scorer; file: a JSONL"
    )
    path: str = Field("", description="file: JSONL with prompt, chosen, rejected per line")
    gold: Literal["vader", "keyword", "length"] = Field(
        "vader", description="gold scorer: vader sentiment, keyword presence, or word count"
    )
    keywords: list[str] = Field(
        ["happy", "glad", "smiled", "laughed"], description="keyword: words that score 1"
    )
    prompts: int = Field(1000, ge=2, description="RL prompts to sample for (at most all of them)")
    samples_per_prompt: int = Field(
        12, ge=2, le=16, description="k responses per prompt; every pair of them is labelled"
    )
    max_new_tokens: int = Field(48, ge=1, description="response length limit when sampling")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    tau: float = Field(
        0.1, ge=0, description="labeller noise: P(a>b) = sigmoid((g(a)-g(b))/tau); 0 = exact"
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of prompts held out")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="weights the SFT samples are drawn with; auto: bf16 where the reward model "
        "trains in bf16",
    )
    batch_size: int = Field(512, ge=1, description="rows sampled at once")

    @model_validator(mode="after")
    def _check(self) -> PreferenceParams:
        if self.source == "file" and not self.path:
            raise ValueError("preference.source is 'file': set preference.path to the JSONL")
        if self.gold == "keyword" and not self.keywords:
            raise ValueError("preference.gold is 'keyword': give at least one keyword")
        return self


class RewardParams(TrainParams):
    """Bradley-Terry reward model on the SFT backbone with a scalar head (stage: reward)."""

    lr: LearningRate = 1e-3
    warmup_steps: WarmupSteps = 10
    max_steps: OptimizerSteps = 300
    batch_size: int = Field(
        8, ge=1, description="pairs (batching: pair) or prompts (batching: prompt) per micro-batch"
    )
    batching: Literal["pair", "prompt"] = Field(
        "prompt",
        description="pair: independent pairs; prompt: all pairs of a prompt, one pass a response",
    )
    weight_decay: WeightDecay = 0.1
    eval_every: EvalEvery = 50
    checkpoint_every: CheckpointEvery = 50
    keep_best: bool = Field(
        True,
        description="end with the weights of the evaluation with the lowest val loss (a reward "
        "model over-fits small preference sets)",
    )
    margin: float = Field(0.0, ge=0, description="loss: -log sigmoid(r_chosen - r_rejected - m)")
    pooling: Literal["last", "mean", "sum"] = Field(
        "mean",
        description="last token (as plain transformers), or the mean or sum over response tokens",
    )
    norm_samples: int = Field(
        512, ge=16, description="fresh SFT samples that fit the gain/bias (mean 0, std 1)"
    )
