"""Sections of what is made from the RL policy and how runs are recorded: compression, ONNX
export, the report card, and MLflow tracking.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmpipe.config.base import (
    CheckpointEvery,
    Device,
    EvalEvery,
    GradClip,
    Precision,
    Section,
    Sharding,
)
from lmpipe.config.training import TrainParams


class CompressParams(Section):
    """Distil, prune and quantize the RL policy into smaller models (stage: compress)."""

    distill: bool = Field(True, description="make the distilled student")
    prune: bool = Field(True, description="make the structurally pruned model")
    quantize: bool = Field(True, description="make the int8 weight-only model")
    student_layers: int = Field(2, ge=1, description="distilled: transformer blocks")
    student_d_model: int = Field(0, ge=0, description="distilled: hidden width (0 = teacher's)")
    student_heads: int = Field(0, ge=0, description="distilled: attention heads (0 = teacher's)")
    student_d_ff: int = Field(
        320, ge=0, description="distilled: MLP width (0 = the arch default for its width)"
    )
    student_init: Literal["teacher", "random"] = Field(
        "teacher",
        description="teacher: copy its embeddings, spread layers, most important neurons/heads",
    )
    kd_temperature: float = Field(1.0, gt=0, description="softmax temperature T of the KD loss")
    kd_alpha: float = Field(
        1.0, ge=0, le=1, description="weight of T^2*KL(teacher||student); 1 - it weighs CE"
    )
    teacher_samples: int = Field(
        2000, ge=0, description="teacher samples for RL prompts to distil on (0 = corpus only)"
    )
    sample_fraction: float = Field(
        0.5, ge=0, le=1, description="share of each batch from teacher samples (rest: corpus)"
    )
    lr: float = Field(1e-3, gt=0, le=1, description="distillation peak learning rate")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps (both trainings)")
    distill_steps: int = Field(300, ge=1, description="distillation optimizer steps")
    batch_size: int = Field(32, ge=1, description="sequences per micro-batch")
    window: int = Field(
        0, ge=0, description="tokens per training and val window (0 = the model's context)"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay on matrices")
    grad_clip: GradClip = 1.0
    prune_importance: Literal["taylor", "magnitude"] = Field(
        "taylor", description="taylor: activation x gradient on calibration batches; magnitude"
    )
    prune_mlp: float = Field(0.3, ge=0, lt=1, description="share of MLP neurons removed per layer")
    prune_heads: float = Field(
        0.0, ge=0, lt=1, description="share of (key/value) attention heads removed per layer"
    )
    calibration_batches: int = Field(8, ge=1, description="batches that score importance")
    recovery_steps: int = Field(50, ge=0, description="pruned: distillation steps after pruning")
    recovery_lr: float = Field(5e-4, gt=0, le=1, description="pruned: recovery peak learning rate")
    quantize_embeddings: bool = Field(True, description="quantized: int8 input embedding too")
    eval_every: EvalEvery = 50
    eval_batches: int = Field(8, ge=1, description="fixed val batches (val perplexity, KL)")
    eval_prompts: int = Field(32, ge=1, description="eval prompts for gold and proxy scores")
    eval_samples: int = Field(8, ge=1, description="samples per eval prompt and model")
    max_new_tokens: int = Field(48, ge=1, description="sampled response length limit")
    speed_new_tokens: int = Field(64, ge=1, description="tokens per row in the generation timing")
    checkpoint_every: CheckpointEvery = 100
    precision: Precision = "auto"
    device: Device = "auto"
    sharding: Sharding = "none"

    def train_params(self, kind: Literal["distill", "recovery"]) -> TrainParams:
        """The shared loop's settings for the distillation or the pruned model's recovery."""
        return TrainParams(
            lr=self.lr if kind == "distill" else self.recovery_lr,
            warmup_steps=self.warmup_steps,
            max_steps=max(self.distill_steps if kind == "distill" else self.recovery_steps, 1),
            batch_size=self.batch_size,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            eval_every=self.eval_every,
            eval_batches=self.eval_batches,
            checkpoint_every=self.checkpoint_every,
            precision=self.precision,
            device=self.device,
            sharding=self.sharding,
        )

    @model_validator(mode="after")
    def _check(self) -> CompressParams:
        d, h = self.student_d_model, self.student_heads
        if d and h and d % h:
            raise ValueError(
                f"student_d_model = {self.student_d_model} must be divisible by "
                f"student_heads = {self.student_heads}"
            )
        if self.student_init == "teacher" and self.student_d_model:
            raise ValueError(
                "student_init 'teacher' copies the teacher's width: leave student_d_model at 0, "
                "or use student_init: random"
            )
        return self


class ExportParams(Section):
    """ONNX bundles with a KV cache, checked against PyTorch (stage: export)."""

    variants: list[str] = Field(
        ["rl", "distilled", "pruned"],
        description="models to export: rl, or a folder name under models/compressed",
    )
    opset: int = Field(18, ge=17, le=23, description="ONNX opset")
    int8: bool = Field(True, description="also write model.int8.onnx (onnxruntime dynamic int8)")
    int8_per_channel: bool = Field(True, description="int8: one weight scale per output channel")
    int8_activations: bool = Field(
        True,
        description="int8: quantize activations at run time too (false: weights only, for "
        "pretrained models whose activation outliers int8 activations cannot hold)",
    )
    fp16: bool = Field(
        False, description="also write model.fp16.onnx for the CUDA execution provider"
    )
    parity_prompts: int = Field(16, ge=1, description="eval prompts in the parity check")
    parity_steps: int = Field(32, ge=1, description="greedy decode steps compared with PyTorch")
    max_logit_diff: float = Field(
        1e-4, gt=0, description="fp32 gate: largest |logit difference| to PyTorch allowed"
    )
    ppl_batches: int = Field(4, ge=1, description="val windows batches for the int8 ppl change")
    ppl_window: int = Field(0, ge=0, description="tokens per ppl window (0 = the model's context)")
    max_new_tokens: int = Field(64, ge=1, description="bundle default: new tokens per request")
    temperature: float = Field(1.0, ge=0, description="bundle default: sampling temperature")
    top_k: int = Field(0, ge=0, description="bundle default: top-k (0 = off)")
    top_p: float = Field(1.0, gt=0, le=1, description="bundle default: nucleus top-p (1 = off)")
    register_model: bool = Field(
        True, description="register each bundle as a model version in the MLflow registry"
    )

    @model_validator(mode="after")
    def _check(self) -> ExportParams:
        if not self.variants:
            raise ValueError("export.variants is empty: name at least one model to export")
        if "quantized" in self.variants:
            raise ValueError(
                "'quantized' is a torchao int8 model for PyTorch; the ONNX int8 model is made "
                "from each fp32 export (export.int8), so leave it out of export.variants"
            )
        return self


class EvaluateParams(Section):
    """The report card of every model the pipeline made (stage: evaluate)."""

    eval_prompts: int = Field(32, ge=1, description="held-out prompts (data/prepared eval set)")
    samples_per_prompt: int = Field(4, ge=2, description="samples per prompt and model (T = 1)")
    max_new_tokens: int = Field(48, ge=1, description="longest response sampled")
    ppl_windows: int = Field(32, ge=1, description="test-split windows for perplexity")
    ppl_context: int = Field(0, ge=0, description="window length (0 = the model's context)")
    best_of_n: list[int] = Field(
        [1, 2, 4, 8, 16], description="best-of-n from SFT, ranked by the proxy: the values of n"
    )
    self_bleu_texts: int = Field(128, ge=2, description="samples per model used for self-BLEU")
    speed_batch: int = Field(8, ge=1, description="batch for the tokens/s figure")
    speed_new_tokens: int = Field(32, ge=1, description="tokens generated per timed run")
    speed_repeats: int = Field(3, ge=1, description="timed runs per figure (median)")
    side_by_side: int = Field(4, ge=0, description="prompts shown side by side in report.md")
    device: Device = "auto"

    @field_validator("best_of_n")
    @classmethod
    def _bon(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("best_of_n needs one or more n >= 1, e.g. [1, 2, 4, 8, 16]")
        return sorted(set(v))


class TrackingParams(Section):
    """MLflow; read by every stage but no stage's dependency."""

    enabled: bool = Field(True, description="log to MLflow; false uses a null tracker")
    uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI (MLFLOW_TRACKING_URI wins); relative sqlite = repo root",
    )
    experiment: str = Field("lmpipe", min_length=1, description="MLflow experiment name")
    timeout_s: float = Field(10.0, gt=0, description="seconds before an unreachable server fails")
    log_models: bool = Field(
        True,
        description="log every PyTorch model a stage writes as a loadable MLflow model, registered "
        "as lmpipe-<name>-torch (each is a copy: false for models of several GB)",
    )
