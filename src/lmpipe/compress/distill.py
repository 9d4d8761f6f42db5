"""Knowledge distillation: the loss, the teacher's samples and the mixed batches it trains on.

The student matches the teacher's next-token distribution (forward KL at temperature T, scaled
by T² so gradients keep their size as T changes; Hinton et al. 2015), optionally mixed with
cross-entropy on the batch's own targets. Batches mix corpus windows (every position a target)
with the teacher's samples for RL prompts (targets on the response only), so the student learns
both the language and what the aligned policy says to the prompts it was tuned on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from lmpipe.batches import IGNORE, Batch, Example, PairBatches, Parts, TokenWindows
from lmpipe.compress.prune import Importance, shrink, spread_layers, top_k
from lmpipe.config import CompressParams, ModelParams, ParamsError
from lmpipe.dist import gather_shards, shard
from lmpipe.losses import cross_entropy_sum, forward_kl_sum
from lmpipe.model import build_model, ff_width
from lmpipe.sampling import generate
from lmpipe.streams import stream_keys


def kd_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Σ over target positions of α·T²·KL(p_T^teacher ‖ p_T^student) + (1 − α)·CE(labels).

    Logits are (..., V) and labels (...) with IGNORE where there is no target; fp32 reduction.
    No gradient flows to the teacher's logits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    sel = labels != IGNORE
    v = student_logits.shape[-1]
    if bool(sel.all()):  # corpus windows: every position is a target, so no copy is needed
        s, t = student_logits.reshape(-1, v), teacher_logits.reshape(-1, v)
    else:
        s, t = student_logits[sel], teacher_logits[sel]
    loss = torch.zeros((), dtype=torch.float32, device=s.device)
    if alpha > 0:
        loss = loss + alpha * temperature**2 * forward_kl_sum(s, t, temperature)
    if alpha < 1:
        loss = loss + (1 - alpha) * cross_entropy_sum(s, labels[sel])
    return loss


class DistillLoss:
    """`loss_sum(model, batch)` for the shared training loop: the teacher runs frozen on the
    same batch. Padding sits on the right, so causal logits of real tokens are unaffected."""

    def __init__(self, teacher: torch.nn.Module, temperature: float, alpha: float) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher(input_ids=batch.input_ids, use_cache=False).logits
        s = model(input_ids=batch.input_ids, use_cache=False).logits
        return kd_loss_sum(s, t, batch.labels, self.temperature, self.alpha)


@torch.no_grad()
def teacher_examples(
    teacher: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    pad_id: int,
    temperature: float,
    seed: int,
    batch_size: int = 128,
) -> list[Example]:
    """One teacher sample per prompt as a training example: targets on the response (and EOS
    when the teacher stopped), none on the prompt. Each prompt samples on its own stream (seed,
    its position); under torchrun every rank calls, samples its share and gets every example."""
    mine = shard(len(prompts))
    out: list[Example] = []
    for start in range(0, len(mine), batch_size):
        rows = mine[start : start + batch_size]
        chunk = [prompts[i] for i in rows]
        g = generate(
            teacher,
            chunk,
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            pad_id=pad_id,
            temperature=temperature,
            row_keys=stream_keys(seed, torch.tensor(rows)),
        )
        for p, row, n in zip(chunk, g.response.tolist(), g.lengths.tolist(), strict=True):
            seq = [*p, *row[:n]]
            labels = [IGNORE] * (len(p) - 1) + row[:n]
            out.append(Example(seq[:-1], labels))
    return gather_shards(out, len(prompts))


class MixedBatches:
    """Each micro-batch: `n_samples` teacher-sample rows and the rest corpus windows, as two
    `Parts` of their own widths (samples are shorter than the context, and padding them to the
    windows' width cost time: README, compress). Both parts draw from their own seeded
    generators, saved in checkpoints."""

    def __init__(
        self,
        tokens: np.ndarray,
        context: int,
        examples: Sequence[Example],
        batch_size: int,
        sample_fraction: float,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.n_samples = round(batch_size * sample_fraction) if examples else 0
        self.n_windows = batch_size - self.n_samples
        self.pad_id = pad_id
        self.windows = (
            TokenWindows(tokens, context, self.n_windows, seed, rank, world)
            if self.n_windows
            else None
        )
        self.samples = (
            PairBatches(examples, self.n_samples, seed + 1, pad_id, rank, world)
            if self.n_samples
            else None
        )

    def next_batch(self) -> Batch | Parts:
        parts = []
        if self.windows is not None:
            parts.append(self.windows.next_batch())
        if self.samples is not None:
            parts.append(self.samples.next_batch())
        return parts[0] if len(parts) == 1 else Parts(tuple(parts))

    def state_dict(self) -> dict[str, Any]:
        return {
            "windows": self.windows.state_dict() if self.windows else None,
            "samples": self.samples.state_dict() if self.samples else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.windows is not None:
            self.windows.load_state_dict(state["windows"])
        if self.samples is not None:
            self.samples.load_state_dict(state["samples"])


def teacher_shape(config: Any) -> ModelParams:
    """The `model` params that would build a model of this (llama or gpt2) config."""
    if config.model_type == "llama":
        return ModelParams(
            arch="llama",
            d_model=config.hidden_size,
            n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            d_ff=config.intermediate_size,
            context=config.max_position_embeddings,
            tie_embeddings=config.tie_word_embeddings,
            rope_theta=config.rope_theta if getattr(config, "rope_theta", None) else 10000.0,
        )
    return ModelParams(
        arch="gpt2",
        d_model=config.n_embd,
        n_layers=config.n_layer,
        n_heads=config.n_head,
        d_ff=config.n_inner or 4 * config.n_embd,
        context=config.n_positions,
        tie_embeddings=config.tie_word_embeddings,
    )


def student_shape(teacher: ModelParams, cfg: CompressParams) -> ModelParams:
    """The student's `model` params: the teacher's, with the `compress.student_*` overrides."""
    heads = cfg.student_heads or teacher.n_heads
    kv = teacher.n_kv_heads or teacher.n_heads
    group = teacher.n_heads // kv
    shape = dict(teacher.model_dump(), n_layers=cfg.student_layers, n_heads=heads, d_ff=0)
    shape["d_model"] = cfg.student_d_model or teacher.d_model
    shape["n_kv_heads"] = heads // group if heads % group == 0 else 0
    try:
        student = ModelParams(**shape)
        return ModelParams(**dict(shape, d_ff=cfg.student_d_ff or ff_width(student)))
    except ValueError as err:
        raise ParamsError(f"compress.student_*: {err}") from None


def build_student(
    teacher: PreTrainedModel, cfg: CompressParams, importance: Importance | None, seed: int
) -> PreTrainedModel:
    """The student before distillation. `student_init: teacher` copies the embeddings, an even
    spread of the teacher's layers and, in each, its most important neurons and heads;
    `random` builds a fresh model of the student's shape."""
    t = teacher_shape(teacher.config)
    s = student_shape(t, cfg)
    if cfg.student_init == "random":
        c = teacher.config
        special = {"<|bos|>": c.bos_token_id, "<|eos|>": c.eos_token_id, "<|pad|>": c.pad_token_id}
        model = build_model(s, c.vocab_size, special, seed)
        return model.to(next(teacher.parameters()).device)
    problems = []
    if s.n_layers > t.n_layers:
        problems.append(f"student_layers {s.n_layers} > the teacher's {t.n_layers}")
    if s.d_ff > t.d_ff:
        problems.append(f"student_d_ff {s.d_ff} > the teacher's {t.d_ff}")
    kv_t = t.n_kv_heads or t.n_heads
    kv_s = s.n_kv_heads or s.n_heads
    if s.n_heads > t.n_heads or s.n_heads * kv_t != kv_s * t.n_heads:
        problems.append(
            f"student_heads {s.n_heads} must be at most the teacher's {t.n_heads} and a "
            f"multiple of its {t.n_heads // kv_t} query heads per key/value head"
        )
    if t.arch == "gpt2" and s.n_heads != t.n_heads:
        problems.append("gpt2 heads cannot be removed (head width is tied to the model width)")
    if problems:
        raise ParamsError(
            "compress.student_init is 'teacher' but the student does not fit inside the teacher: "
            + "; ".join(problems)
            + ". Change those keys, or set compress.student_init: random."
        )
    if importance is None:
        raise ValueError("student_init 'teacher' needs importance scores")
    keep_groups = top_k(importance.heads, kv_s) if importance.heads is not None else None
    layers = spread_layers(t.n_layers, s.n_layers)
    return shrink(teacher, top_k(importance.neurons, s.d_ff), keep_groups, layers)
