"""Typed, validated params: one pydantic model per section of `params.yaml`.

Every field has a default and a one-line description; unknown keys and wrong types fail at load
time, before any work, with the full key (`data.val_fraction`), the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
"""What a `device` param may say."""


def _device(v: str) -> str:
    if not DEVICE.fullmatch(v):
        raise ValueError("use auto, cpu, cuda or cuda:N")
    return v


class ParamsError(ValueError):
    """Invalid `params.yaml`: the message says which key, what was given and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class BaseParams(Section):
    """The model to start from; '' trains one from scratch (stages: base, prepare, pretrain)."""

    model: str = Field(
        "",
        description="'' = from scratch; or a Hugging Face model folder, a .gguf file, or a hub id",
    )
    revision: str | None = Field(
        None, description="hub ids: the commit or tag to load (recorded in every manifest)"
    )
    template: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="auto: the base's own chat template if any; chat: require it; plain: prompt, "
        "blank line, answer (from scratch: always lmpipe's one-turn format)",
    )

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return v.strip()


class DataParams(Section):
    """Corpus source, cleanup, split, SFT pairs and prompt sets (stage: prepare)."""

    source: Literal["builtin", "text", "jsonl", "hf"] = Field(
        "builtin", description="where documents come from"
    )
    path: str = Field(
        "",
        description="text: file or glob; jsonl: file or glob; hf: dataset name or save_to_disk dir",
    )
    field: str = Field("text", description="jsonl/hf: the field that holds a document's text")
    hf_config: str | None = Field(None, description="hf: dataset configuration name")
    hf_split: str = Field("train", description="hf: split to read")
    separator: str = Field(
        r"\n\s*\n", description="text: regex that separates documents (default: blank lines)"
    )

    @field_validator("separator")
    @classmethod
    def _separator(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as err:
            raise ValueError(f"not a valid regular expression ({err})") from None
        return v

    chunk_chars: int = Field(
        0, ge=0, description="text: >0 cuts each file into chunks of about this many characters"
    )
    encoding: str = Field("utf-8", description="text/jsonl: file encoding")
    encoding_errors: Literal["strict", "replace", "ignore"] = Field(
        "strict",
        description="undecodable bytes: strict fails, replace writes U+FFFD, ignore drops them",
    )
    builtin_stories: int = Field(20000, ge=10, description="builtin: number of generated stories")
    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normalisation applied to every document"
    )
    min_chars: int = Field(20, ge=1, description="documents shorter than this after cleanup drop")
    max_docs: int = Field(0, ge=0, description="keep at most this many documents (0 = all)")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of documents for val")
    test_fraction: float = Field(0.05, gt=0, lt=1, description="share of documents for test")
    sft_path: str = Field(
        "", description="JSONL with prompt/response fields; empty = pairs built from documents"
    )
    prompt_sentences: int = Field(1, ge=1, description="sentences of a document used as prompt")
    response_sentences: int = Field(
        3, ge=1, description="sentences after the prompt used as the SFT response"
    )
    max_prompt_chars: int = Field(300, ge=10, description="longer prompts are skipped")
    max_response_chars: int = Field(400, ge=10, description="longer responses are cut at a word")
    rl_prompts: int = Field(2000, ge=1, description="RL prompts taken from the val documents")
    rl_prompts_min: int = Field(
        1000,
        ge=0,
        description="when the val documents give fewer RL prompts than this, the rest come from "
        "the train documents' prompts (a small corpus; 0 = val only)",
    )
    eval_prompts: int = Field(200, ge=1, description="evaluation prompts from the test documents")

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves "
                "less than 10% for train; lower them"
            )
        if self.source != "builtin" and not self.path:
            raise ValueError(f"data.source is {self.source!r}: set data.path to the input")
        return self


class TokenizerParams(Section):
    """Byte-level BPE trained on the train split (stage: prepare)."""

    vocab_size: int = Field(4096, ge=300, le=1_000_000, description="BPE vocabulary incl. specials")
    min_frequency: int = Field(2, ge=1, description="pairs seen fewer times are not merged")


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


class ModelParams(Section):
    """Shape of the causal LM trained from scratch (stage: pretrain; SFT and RL inherit it)."""

    arch: Literal["llama", "gpt2"] = Field(
        "llama", description="llama: RoPE, RMSNorm, SwiGLU, optional GQA; gpt2: learned positions"
    )
    d_model: int = Field(256, ge=8, description="hidden width")
    n_layers: int = Field(4, ge=1, description="transformer blocks")
    n_heads: int = Field(4, ge=1, description="attention heads (d_model must divide by it)")
    n_kv_heads: int = Field(0, ge=0, description="llama: key/value heads for GQA (0 = n_heads)")
    d_ff: int = Field(
        0,
        ge=0,
        description="MLP width (0 = 8/3*d_model rounded to 32 for llama, 4*d_model for gpt2)",
    )
    context: int = Field(128, ge=8, description="maximum sequence length in tokens")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in attention and MLP")
    tie_embeddings: bool = Field(True, description="share input embedding and output head")
    rope_theta: float = Field(10000.0, gt=0, description="llama: RoPE base")
    init_std: float = Field(0.02, gt=0, description="std of the normal weight initialisation")

    @model_validator(mode="after")
    def _check(self) -> ModelParams:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model = {self.d_model} must be divisible by n_heads = {self.n_heads}"
            )
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads = {self.n_heads} must be divisible by n_kv_heads = {kv}")
        if self.arch == "gpt2" and self.n_kv_heads not in (0, self.n_heads):
            raise ValueError("n_kv_heads (grouped-query attention) needs arch: llama")
        return self


class TrainParams(Section):
    """Fields shared by every run of the training loop (pretrain, SFT, distillation)."""

    lr: float = Field(2e-3, gt=0, le=1, description="peak learning rate (after warmup)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps")
    max_steps: int = Field(160, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="sequences per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay on matrices (not norms/biases)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm (0 = off)")
    eval_every: int = Field(40, ge=1, description="steps between evaluations")
    eval_batches: int = Field(8, ge=1, description="fixed val batches per evaluation")
    log_every: int = Field(10, ge=1, description="steps between logged training metrics")
    checkpoint_every: int = Field(40, ge=0, description="steps between checkpoints (0 = none)")
    keep_best: bool = Field(
        False, description="end with the weights of the evaluation with the lowest val loss"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA and on AMX or AVX512-BF16 CPUs, else fp32"
    )
    compile: bool = Field(False, description="torch.compile the model")
    device: Annotated[str, AfterValidator(_device)] = Field(
        "auto", description="auto (CUDA if present), cpu, cuda, cuda:N"
    )
    peak_tflops: float = Field(0.0, ge=0, description="for train/mfu; 0 = known GPU table or none")


class PretrainParams(TrainParams):
    """Next-token training on the prepared tokens, from scratch or the base (stage: pretrain)."""

    max_steps: int = Field(
        160, ge=0, description="optimizer steps (0: with a base model, pass it through unchanged)"
    )


class SftParams(TrainParams):
    """Supervised fine-tuning on prompt/response pairs, loss on the response (stage: sft)."""

    lr: float = Field(5e-4, gt=0, le=1, description="peak learning rate (after warmup)")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps")
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay on matrices (not norms/biases)")
    eval_every: int = Field(25, ge=1, description="steps between evaluations")
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints (0 = none)")
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

    lr: float = Field(5e-4, gt=0, le=1, description="peak learning rate (after warmup)")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps")
    max_steps: int = Field(300, ge=1, description="optimizer steps")
    batch_size: int = Field(
        8, ge=1, description="pairs (batching: pair) or prompts (batching: prompt) per micro-batch"
    )
    batching: Literal["pair", "prompt"] = Field(
        "prompt",
        description="pair: independent pairs; prompt: all pairs of a prompt, one pass a response",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay on matrices (not norms/biases)")
    eval_every: int = Field(50, ge=1, description="steps between evaluations")
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints (0 = none)")
    keep_best: bool = Field(
        True,
        description="end with the weights of the evaluation with the lowest val loss (a reward "
        "model over-fits small preference sets)",
    )
    margin: float = Field(0.0, ge=0, description="loss: -log sigmoid(r_chosen - r_rejected - m)")
    pooling: Literal["last", "mean"] = Field(
        "mean",
        description="last token (as plain transformers) or mean over response tokens",
    )
    norm_samples: int = Field(
        512, ge=16, description="fresh SFT samples that fit the gain/bias (mean 0, std 1)"
    )


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


class DPGParams(Section):
    """DPG's own settings: the proposal q that samples toward p = pi0*exp(r/beta) (rl.algo: dpg)."""

    swap_every: int = Field(4, ge=1, description="steps between checks that replace q by pi")


class RLParams(Section):
    """KL-regularised RL from the SFT model toward the normalised reward (stage: rl)."""

    moved: ClassVar[dict[str, str]] = {
        "ppo_epochs": "ppo.epochs", "clip": "ppo.clip", "value_clip": "ppo.value_clip",
        "vf_coef": "ppo.vf_coef", "gamma": "ppo.gamma", "lam": "ppo.lam",
        "whiten_rewards": "ppo.whiten_rewards", "whiten_advantages": "ppo.whiten_advantages",
        "value_init": "ppo.value_init", "critic_warmup_steps": "ppo.critic_warmup_steps",
        "dpg_swap_every": "dpg.swap_every",
    }  # fmt: skip
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
    lr: float = Field(1e-4, gt=0, le=1, description="Adam learning rate (policy and critic)")
    lr_schedule: Literal["linear", "constant"] = Field(
        "linear", description="linear: decay to 0 over rl.steps (as TRL's default); constant"
    )
    adam_eps: float = Field(1e-5, gt=0, description="Adam epsilon")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm (0 = off)")
    minibatch_size: int = Field(32, ge=1, description="sequences per minibatch / forward chunk")
    ppo: PPOParams = Field(default_factory=PPOParams, description=PPOParams.__doc__)
    dpg: DPGParams = Field(default_factory=DPGParams, description=DPGParams.__doc__)
    eval_prompts: int = Field(32, ge=1, description="held-out prompts for the final evaluation")
    eval_samples: int = Field(8, ge=1, description="policy samples per eval prompt")
    posterior_samples: int = Field(
        64, ge=2, description="pi0 samples per eval prompt for log Z (N)"
    )
    log_every: int = Field(1, ge=1, description="steps between logged metrics")
    checkpoint_every: int = Field(20, ge=0, description="steps between checkpoints (0 = none)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="log-prob/value/update passes; auto: bf16 where training uses it; "
        "sampling and diagnostics fp32",
    )
    device: Annotated[str, AfterValidator(_device)] = Field(
        "auto", description="auto (CUDA if present), cpu, cuda, cuda:N"
    )

    @model_validator(mode="after")
    def _check(self) -> RLParams:
        if self.algo in ("rloo", "dpg") and self.samples_per_prompt < 2:
            raise ValueError(f"rl.algo {self.algo!r} needs rl.samples_per_prompt >= 2")
        return self


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
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm (0 = off)")
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
    eval_every: int = Field(50, ge=1, description="steps between evaluations")
    eval_batches: int = Field(8, ge=1, description="fixed val batches (val perplexity, KL)")
    eval_prompts: int = Field(32, ge=1, description="eval prompts for gold and proxy scores")
    eval_samples: int = Field(8, ge=1, description="samples per eval prompt and model")
    max_new_tokens: int = Field(48, ge=1, description="sampled response length limit")
    speed_new_tokens: int = Field(64, ge=1, description="tokens per row in the generation timing")
    checkpoint_every: int = Field(100, ge=0, description="steps between checkpoints (0 = none)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA and on AMX or AVX512-BF16 CPUs, else fp32"
    )
    device: Annotated[str, AfterValidator(_device)] = Field(
        "auto", description="auto (CUDA if present), cpu, cuda, cuda:N"
    )

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
    device: Annotated[str, AfterValidator(_device)] = Field(
        "auto", description="auto (CUDA if present), cpu, cuda, cuda:N"
    )

    @field_validator("best_of_n")
    @classmethod
    def _bon(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("best_of_n needs one or more n >= 1, e.g. [1, 2, 4, 8, 16]")
        return sorted(set(v))


SECTIONS: dict[str, type[Section]] = {
    "base": BaseParams,
    "data": DataParams,
    "tokenizer": TokenizerParams,
    "model": ModelParams,
    "pretrain": PretrainParams,
    "sft": SftParams,
    "preference": PreferenceParams,
    "reward": RewardParams,
    "rl": RLParams,
    "compress": CompressParams,
    "export": ExportParams,
    "evaluate": EvaluateParams,
    "tracking": TrackingParams,
}
"""Section name → model. Later stages add theirs here."""


@dataclass(frozen=True)
class Params:
    """The sections a stage asked for, validated; `seed` is always there."""

    seed: int
    sections: dict[str, Section]

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"params section {name!r} was not loaded by this stage")

    def flat(self) -> dict[str, Any]:
        """`{"seed": 1, "data.source": "builtin", "rl.ppo.clip": 0.2, ...}` — what MLflow logs."""
        out: dict[str, Any] = {"seed": self.seed}
        for name, section in self.sections.items():
            out.update(_flatten(section.model_dump(), f"{name}."))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, **{k: v.model_dump() for k, v in self.sections.items()}}


def _flatten(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def subsection(model: type[Section], key: str) -> type[Section] | None:
    """The nested section model of `model.key` (`rl.ppo`), or None for a plain field."""
    info = model.model_fields.get(key)
    ann = info.annotation if info is not None else None
    return ann if isinstance(ann, type) and issubclass(ann, Section) else None


def moved_key(model: type[Section], key: str) -> str | None:
    """Where `key` of `model` now lives, relative to `model` (`clip` → `ppo.clip`), if it moved."""
    return getattr(model, "moved", {}).get(key)


def _describe_allowed(section: type[Section], field: str) -> str:
    info = section.model_fields.get(field)
    if info is None:
        return ""
    parts = []
    ann = info.annotation
    if getattr(ann, "__origin__", None) is Literal:
        parts.append("one of " + ", ".join(repr(a) for a in ann.__args__))
    for m in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sym} {getattr(m, attr)}")
    if info.description:
        parts.append(info.description)
    return "; ".join(parts)


def _owner(section: type[Section], loc: list[str]) -> tuple[type[Section], int]:
    """The (nested) section that holds the key of an error at `loc`, and that key's index."""
    i = 0
    while i < len(loc) - 1 and (sub := subsection(section, loc[i])) is not None:
        section, i = sub, i + 1
    return section, i


def _format_error(name: str, section: type[Section], raw: dict, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join([name, *loc]) if loc else name
        owner, i = _owner(section, loc)
        if e["type"] == "extra_forbidden":
            where = ".".join([name, *loc[:i]])
            moved = moved_key(owner, loc[i])
            if moved is not None:
                head, _, leaf = moved.rpartition(".")
                lines.append(
                    f"{key}: moved to {where}.{moved}; write {leaf} under {head} in {where}"
                )
                continue
            valid = list(owner.model_fields)
            near = difflib.get_close_matches(loc[i], valid, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            lines.append(f"{key}: unknown key. {hint}Valid keys of {where}: {', '.join(valid)}")
            continue
        value = raw
        for p in e["loc"]:
            value = value.get(p) if isinstance(value, dict) else None
        allowed = _describe_allowed(owner, loc[i]) if loc else ""
        msg = e["msg"].removeprefix("Value error, ")
        line = f"{key} = {value!r}: {msg}" if loc else f"{key}: {msg}"
        if allowed:
            line += f" (allowed: {allowed})"
        lines.append(line)
    return "\n".join(lines)


def parse_section(name: str, raw: Any) -> Section:
    """Validate one section; raise ParamsError with a message a user can act on."""
    if name not in SECTIONS:
        near = difflib.get_close_matches(name, list(SECTIONS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ParamsError(f"unknown params section {name!r}.{hint} Known: {', '.join(SECTIONS)}")
    model = SECTIONS[name]
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{name}: expected a mapping of keys, got {raw!r}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(name, model, raw, err)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(doc, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    return doc


def load_params(path: str | Path, sections: list[str]) -> Params:
    """Load `seed` and the named sections of a params file, validating all of them.

    Every section present in the file is validated (a typo in an unrelated section still fails
    early), but only `sections` are returned — what the stage depends on.
    """
    return validate_doc(read_yaml(path), sections, where=str(path))


def validate_doc(doc: dict[str, Any], sections: list[str], where: str = "params") -> Params:
    """`load_params` on a dict already read (or merged): every section validated."""
    unknown = [k for k in doc if k != "seed" and k not in SECTIONS]
    if unknown:
        parse_section(unknown[0], doc[unknown[0]])  # raises with a suggestion
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParamsError(f"seed = {seed!r}: must be a non-negative integer")
    errors = []
    parsed: dict[str, Section] = {}
    for name in SECTIONS:
        try:
            parsed[name] = parse_section(name, doc.get(name))
        except ParamsError as err:
            errors.append(str(err))
    if errors:
        raise ParamsError(f"invalid params in {where}:\n" + "\n".join(errors))
    return Params(seed=seed, sections={s: parsed[s] for s in sections})


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render_params_yaml(header: str = "") -> str:
    """params.yaml text for the defaults, each key commented with its description.

    `params.yaml` is written once from this and then edited by users; a test checks that every
    key of every section is there with its description, so the two never drift.
    """
    lines = [header.rstrip(), ""] if header else []
    lines.append("seed: 1337  # every random generator of every stage derives from this")
    for name, model in SECTIONS.items():
        lines.append("")
        lines.append(f"{name}:  # {(model.__doc__ or '').strip().splitlines()[0]}")
        lines += _render_keys(model, "  ")
    return "\n".join(lines) + "\n"


def _render_keys(model: type[Section], indent: str) -> list[str]:
    lines = []
    for key, info in model.model_fields.items():
        sub = subsection(model, key)
        if sub is not None:
            lines.append(f"{indent}{key}:  # {info.description}")
            lines += _render_keys(sub, indent + "  ")
        else:
            lines.append(f"{indent}{key}: {_yaml_scalar(info.default)}  # {info.description}")
    return lines
