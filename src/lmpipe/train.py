"""The one LM training loop (pretrain, SFT and distillation use it).

AdamW without decay on norms and biases, linear warmup then cosine decay to a floor, gradient
clipping, exact gradient accumulation (token-weighted), bf16 autocast, optional torch.compile,
DDP or FSDP (`lmpipe.shard`) when launched by torchrun, periodic eval on fixed batches,
resumable checkpoints whose batch sampler position is part of the state, so a resumed run sees
exactly the batches an uninterrupted one would. The optimizer and schedule are in
`lmpipe.optim`, the checkpoint files in `lmpipe.checkpoints`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lmpipe import shard
from lmpipe.batches import IGNORE, Batch, Parts, split_parts
from lmpipe.checkpoints import CheckpointStore
from lmpipe.config import TrainParams
from lmpipe.io import write_history_csv
from lmpipe.losses import cross_entropy_sum
from lmpipe.model import attention_for, set_attention
from lmpipe.optim import lr_at, make_optimizer
from lmpipe.precision import flops_per_token, peak_flops, use_bf16
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


# --------------------------------------------------------------------------- loss / eval


def lm_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over target positions (fp32 reduction)."""
    logits = model(input_ids=batch.input_ids, use_cache=False).logits  # (B, T, V)
    return cross_entropy_sum(logits.flatten(0, 1), batch.labels.flatten(), IGNORE)


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
    """`loss_sum(model, batch)` as a module's forward, for DDP or FSDP to wrap."""

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
    state = checkpoints.load() if checkpoints else None
    if state is not None:  # whole weights in every rank's checkpoint, sharded or not
        model.load_state_dict(state["model"])
    sharded = shard.enabled(cfg.sharding)
    by_name = cfg.sharding == "fsdp"  # its checkpoints resume on any number of processes
    net: torch.nn.Module = model
    if sharded:
        # the loss inside the root's forward, as for DDP; bf16 weights in the blocks on CUDA
        wrap = functools.partial(LossModule, loss_sum=loss_sum)
        net = shard.twin(model, wrap, bf16 and device.type == "cuda")
        model.to("cpu")  # the whole model waits in host memory while its shards train
    elif world > 1:
        # DDP syncs gradients of what runs inside its forward: the whole loss, so that a loss
        # reading the model's parts (the reward model's pooled head) is synced too
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(LossModule(model, loss_sum), device_ids=ids)
    trained = net if sharded else model  # the parameters the optimizer steps
    opt = make_optimizer(trained, cfg)
    inner = net.model if sharded else model  # the model's own names, in the state it saves
    if cfg.compile:
        net = torch.compile(net)

    def step_loss(b: Any) -> torch.Tensor:
        return net(b) if world > 1 else loss_sum(net, b)

    def val_loss() -> float:
        if sharded:  # every rank runs the root's forward in step
            return evaluate(net, val_batches, device, bf16, lambda m, b: m(b))
        return evaluate(model, val_batches, device, bf16, loss_sum)

    start, history, elapsed, tokens_seen = 0, [], 0.0, 0
    best: dict[str, Any] | None = None  # keep_best: {"step", "loss", "model"} of the best eval
    if state is not None:
        shard.load_optimizer_state(inner, opt, state["optimizer"], by_name)
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
        if sharded:
            shard.sync_whole_grads(trained, average=True)
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip))
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
            last_val = val_loss()
            row["eval/loss"] = last_val
            if cfg.keep_best and (best is None or last_val < best["loss"]):
                best = {"step": done, "loss": last_val, "model": _cpu_copy(inner)}
            window_t0 = time.perf_counter()  # eval time is not training throughput
            if rank == 0:
                log.info(
                    "%s step %d/%d: loss %.4f, eval loss %.4f, lr %.2e, %.0f tokens/s",
                    prefix,
                    done,
                    cfg.max_steps,
                    loss_mean,
                    last_val,
                    lr,
                    tokens_seen / max(elapsed, 1e-9),
                )
        if row and rank == 0:
            row = {"step": done, **row}
            history.append(row)
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=done)
        bar.update(1)
        if checkpoints and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            # gathered whole to rank 0 when sharded (every rank takes part), so a run resumes
            # on any number of processes
            weights = shard.model_state(inner, sharded)
            optim = shard.optimizer_state(inner, opt, by_name)
            if rank == 0:
                checkpoints.save(
                    {
                        "model": weights,
                        "optimizer": optim,
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
    if sharded:  # every rank ends with the whole trained model, as under DDP
        shard.copy_back(trained, model, "model.")
        model.to(device)
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
    """The weights whole on the CPU (a sharded model's gathered: every rank calls it)."""
    return {k: shard.full(v).detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
