"""The one LM training loop (pretrain, SFT and distillation use it).

AdamW without decay on norms and biases, linear warmup then cosine decay to a floor, gradient
clipping, exact gradient accumulation (token-weighted), bf16 autocast, optional torch.compile,
DDP when launched by torchrun, periodic eval on fixed batches, resumable checkpoints whose batch
sampler position is part of the state, so a resumed run sees exactly the batches an uninterrupted
one would.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.batches import IGNORE, Batch, Parts, split_parts
from lmpipe.config import TrainParams
from lmpipe.io import WALL_CLOCK, hash_obj
from lmpipe.model import attention_for, set_attention
from lmpipe.precision import peak_flops, use_bf16
from lmpipe.progress import Progress
from lmpipe.tracking.tracker import NullTracker

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Loss became NaN or infinite; the message gives the step, lr and what to try."""


class BatchSource(Protocol):
    """Yields micro-batches; its state (RNG position) is saved in checkpoints."""

    def next_batch(self) -> Batch | Parts: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state


class TokenWindows:
    """Random windows of a token stream. Every process draws the same global batch from one
    seeded generator and keeps its own slice, so N processes × B = one process × N·B."""

    def __init__(
        self,
        tokens: np.ndarray,
        context: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if len(tokens) <= context + 1:
            raise ValueError(
                f"the token file has {len(tokens)} tokens, fewer than one window of "
                f"context + 1 = {context + 1}: lower model.context or add data"
            )
        self.tokens, self.context, self.batch_size = tokens, context, batch_size
        self.rank, self.world = rank, world
        self.rng = np.random.default_rng(seed)
        self.pin = torch.cuda.is_available()

    def windows(self, starts: np.ndarray) -> Batch:
        idx = starts[:, None] + np.arange(self.context + 1)[None, :]  # (B, T+1)
        block = torch.from_numpy(self.tokens[idx].astype(np.int64))
        if self.pin:
            block = block.pin_memory()
        return Batch(block[:, :-1], block[:, 1:])

    def next_batch(self) -> Batch:
        high = len(self.tokens) - self.context - 1
        starts = self.rng.integers(0, high, size=self.batch_size * self.world)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.windows(mine)

    def fixed_batches(self, n: int) -> list[Batch]:
        """`n` evenly spaced, deterministic batches (the val set evaluated every time)."""
        high = len(self.tokens) - self.context - 1
        starts = np.linspace(0, high, num=n * self.batch_size, dtype=np.int64)
        return [self.windows(s) for s in starts.reshape(n, self.batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


# --------------------------------------------------------------------------- schedule / optim


def lr_at(step: int, cfg: TrainParams) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr_ratio·lr at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights); never norms or biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, cfg: TrainParams) -> torch.optim.AdamW:
    """AdamW, fused kernel where the device has one (CUDA and CPU in torch ≥ 2.4)."""
    groups = param_groups(model, cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def flops_per_token(model: torch.nn.Module) -> float:
    """6·N for the matmuls (forward + backward) + attention scores, as in the PaLM appendix."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    d = getattr(c, "hidden_size", None) or c.n_embd
    ctx = getattr(c, "max_position_embeddings", None) or c.n_positions
    return 6 * n + 12 * layers * d * ctx


# --------------------------------------------------------------------------- loss / eval


def lm_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over target positions (fp32 reduction)."""
    logits = model(input_ids=batch.input_ids, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(
        logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    device: torch.device,
    bf16: bool,
    loss_sum: Callable[[torch.nn.Module, Batch], torch.Tensor] = lm_loss_sum,
) -> float:
    """Mean loss per target (token, or pair for the reward model) over fixed batches."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        b = b.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            total += float(loss_sum(model, b))
        n += b.n_targets
    model.train(was_training)
    return total / max(n, 1)


# --------------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointStore:
    """One checkpoint file per training run, in a folder keyed by the hash of params + inputs:
    a run with other params or inputs looks in another folder and never resumes this one."""

    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / "checkpoint.pt"

    def save(self, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt checkpoint is discarded, never half-used
            log.warning("ignoring unreadable checkpoint %s (%s)", self.path, err)
            return None

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    val_loss: float
    tokens_per_sec: float
    train_seconds: float
    steps: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    kept_step: int | None = None  # keep_best: the step whose weights the model ends with


def checkpoint_store(root: str | Path, stage: str, key: dict[str, Any]) -> CheckpointStore:
    """`<root>/<stage>-<hash>`: the hash covers params and input hashes (see CheckpointStore)."""
    return CheckpointStore(Path(root) / f"{stage}-{hash_obj(key)[:16]}")


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_sum(x: float, device: torch.device) -> float:
    if _dist()[1] == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item())


class LossModule(torch.nn.Module):
    """`loss_sum(model, batch)` as a module's forward, for DDP to wrap."""

    def __init__(self, model: torch.nn.Module, loss_sum: Callable) -> None:
        super().__init__()
        self.model, self.loss_sum = model, loss_sum

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_sum(self.model, batch)


def train(
    model: torch.nn.Module,
    source: BatchSource,
    cfg: TrainParams,
    *,
    val_batches: Sequence[Batch],
    loss_sum: Callable[[torch.nn.Module, Batch], torch.Tensor] = lm_loss_sum,
    tracker: NullTracker | None = None,
    checkpoints: CheckpointStore | None = None,
    plot_csv: Path | None = None,
    prefix: str = "train",
    stop_after: int | None = None,
) -> TrainResult:
    """Train `model` in place for `cfg.max_steps` optimizer steps.

    `loss_sum(model, batch)` returns the summed loss over the batch's target tokens; the loop
    divides by the tokens of the whole step (all micro-batches, all processes), so accumulation
    and DDP give the gradient of one big batch. `stop_after` ends early (tests of resume).
    """
    tracker = tracker or NullTracker()
    rank, world = _dist()
    device = next(model.parameters()).device
    bf16 = use_bf16(cfg.precision, device)
    if rank == 0:
        # `auto` resolves per machine: the tag says which precision this run trained in.
        resolved = "bf16" if bf16 else "fp32"
        tracker.set_tags({f"{prefix}/precision": resolved})
        log.info("%s: precision %s (%s) on %s", prefix, resolved, cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_attention(model, attention_for(device))
    model.train()
    opt = make_optimizer(model, cfg)
    net: torch.nn.Module = model
    if world > 1:
        # DDP syncs gradients of what runs inside its forward: the whole loss, so that a loss
        # reading the model's parts (the reward model's pooled head) is synced too
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(LossModule(model, loss_sum), device_ids=ids)
    if cfg.compile:
        net = torch.compile(net)

    def step_loss(b: Any) -> torch.Tensor:
        return net(b) if world > 1 else loss_sum(net, b)

    start, history, elapsed, tokens_seen = 0, [], 0.0, 0
    best: dict[str, Any] | None = None  # keep_best: {"step", "loss", "model"} of the best eval
    state = checkpoints.load() if checkpoints else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        source.load_state_dict(state["source"])
        torch.set_rng_state(state["torch_rng"])
        start, history = state["step"], state["history"]
        elapsed, tokens_seen = state["elapsed"], state["tokens_seen"]
        best = state.get("best")
        if rank == 0:
            log.warning("resuming from checkpoint at step %d (%s)", start, checkpoints.path)

    peak = peak_flops(cfg, device)
    fpt = flops_per_token(model)
    last_val = history[-1].get("eval/loss", float("nan")) if history else float("nan")
    bar = Progress(cfg.max_steps, prefix, initial=start, enabled=rank == 0)
    step = start
    window_t0, window_tokens = time.perf_counter(), 0
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        micro = [b for _ in range(cfg.grad_accum) for b in split_parts(source.next_batch())]
        n_targets = _all_sum(sum(b.n_targets for b in micro), device)
        loss_total = 0.0
        for i, b in enumerate(micro):
            b = b.to(device)
            sync = i == len(micro) - 1 or world == 1
            ctx = (
                net.no_sync()
                if (not sync and hasattr(net, "no_sync"))
                else contextlib.nullcontext()
            )
            with ctx:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = step_loss(b)
                # DDP averages gradients over processes; scale so the result is sum / all tokens.
                (loss * world / max(n_targets, 1)).backward()
            loss_total += float(loss.detach())
        loss_mean = _all_sum(loss_total, device) / max(n_targets, 1)
        if not math.isfinite(loss_mean):
            raise TrainingDiverged(
                f"{prefix} loss is {loss_mean} at step {step} (lr {lr:.3g}). Try a lower lr, "
                "more warmup_steps, grad_clip: 1.0, or precision: fp32."
            )
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            if cfg.grad_clip
            else float("nan")
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_tok = sum(b.input_ids.numel() for b in micro) * world
        tokens_seen += n_tok
        window_tokens += n_tok
        elapsed += time.perf_counter() - t0

        done = step + 1
        row: dict[str, float] = {}
        if done % cfg.log_every == 0 or done == end:
            dt = time.perf_counter() - window_t0
            tps = window_tokens / max(dt, 1e-9)
            row = {
                f"{prefix}/loss": loss_mean,
                f"{prefix}/lr": lr,
                f"{prefix}/grad_norm": grad_norm,
                f"{prefix}/tokens_per_sec": tps,
            }
            if peak:
                row[f"{prefix}/mfu"] = tps * fpt / peak
            window_t0, window_tokens = time.perf_counter(), 0
            bar.fields.update(loss=f"{loss_mean:.3f}", tokens_per_s=f"{tps:,.0f}")
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            last_val = evaluate(model, val_batches, device, bf16, loss_sum)
            row["eval/loss"] = last_val
            if cfg.keep_best and (best is None or last_val < best["loss"]):
                best = {"step": done, "loss": last_val, "model": _cpu_copy(model)}
            window_t0 = time.perf_counter()  # eval time is not training throughput
            if rank == 0:
                log.info(
                    "%s step %d/%d: loss %.4f, eval loss %.4f, lr %.2e, %.0f tokens/s",
                    prefix, done, cfg.max_steps, loss_mean, last_val, lr,
                    tokens_seen / max(elapsed, 1e-9),
                )  # fmt: skip
        if row and rank == 0:
            row = {"step": done, **row}
            history.append(row)
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=done)
        bar.update(1)
        if checkpoints and rank == 0 and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            checkpoints.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "source": source.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "step": done,
                    "history": history,
                    "elapsed": elapsed,
                    "tokens_seen": tokens_seen,
                    "best": best,
                }
            )
    bar.close()
    kept = None
    if cfg.keep_best and best is not None and end == cfg.max_steps:
        kept = best["step"]
        if kept != end:
            model.load_state_dict(best["model"])
            last_val = best["loss"]
            if rank == 0:
                log.info("%s: kept the weights of step %d (val loss %.4f)", prefix, kept, last_val)
    if plot_csv is not None and rank == 0:
        write_history_csv(plot_csv, history)
    return TrainResult(
        val_loss=last_val,
        tokens_per_sec=tokens_seen / max(elapsed, 1e-9),
        train_seconds=elapsed,
        steps=end,
        resumed_from=start,
        history=history,
        kept_step=kept,
    )


def _cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def speed_csv(path: Path) -> Path:
    """Where write_history_csv puts a curve file's wall-clock columns: `<name>_speed.csv`."""
    return path.with_name(f"{path.stem}_speed{path.suffix}")


def write_history_csv(path: Path, history: Sequence[dict[str, float]]) -> None:
    """One row per logged step, every column that ever appeared (empty where absent).

    Wall-clock columns (throughput, time shares) go to `speed_csv(path)`, so the curves that
    later stages read are the same bytes for the same training, resumed or not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for row in history:
        cols.extend(k for k in row if k not in cols)
    for target, keep in ((path, False), (speed_csv(path), True)):
        fields = [c for c in cols if c == "step" or bool(WALL_CLOCK.search(c)) == keep]
        with target.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for row in history:
                if keep and not any(WALL_CLOCK.search(k) for k in row):
                    continue
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
