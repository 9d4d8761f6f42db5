"""Token batches with shifted labels, what every trainer feeds its model.

A `Batch` holds input ids and labels already shifted (labels[:, t] is the target after token t),
IGNORE where no loss is taken (prompt tokens, template markers, padding). `Example`s are single
sequences; `collate` right-pads them into a `Batch`; `PairBatches` draws them in seeded epochs,
each process taking its slice of the global batch; `TokenWindows` draws random windows of a
token stream (pretraining, distillation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IGNORE = -100
"""Label value that carries no loss (prompt tokens, padding)."""


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, already shifted: labels[:, t] is the target after t

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return Batch(
            self.input_ids.to(device, non_blocking=nb), self.labels.to(device, non_blocking=nb)
        )


@dataclass
class Parts:
    """Batches of different widths that make one micro-batch: the loop runs each through the
    model on its own (no row padded to the widest part) and steps once on their summed loss."""

    parts: tuple[Batch, ...]


def split_parts(batch: Batch | Parts) -> list[Batch]:
    return list(batch.parts) if isinstance(batch, Parts) else [batch]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # already shifted: labels[t] is the target after input_ids[t]


def example(ids: Sequence[int], loss: Sequence[bool], context: int) -> Example | None:
    """Inputs and shifted targets of a sequence whose `loss` tokens are learnt, cut to the
    context; None when no learnt token is left."""
    seq, loss = list(ids[: context + 1]), list(loss[: context + 1])
    if not any(loss[1:]):
        return None
    targets = [t if m else IGNORE for t, m in zip(seq[1:], loss[1:], strict=True)]
    return Example(seq[:-1], targets)


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example. With a causal mask, right padding never changes the
    logits of real tokens, so no attention mask is needed; padded labels carry no loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return Batch(ids, labels)


class PairBatches:
    """Epochs of seeded permutations; each process takes its slice of the global batch.
    Subclasses change `collate` (the reward model batches preference pairs)."""

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.examples, self.batch_size, self.pad_id = list(examples), batch_size, pad_id
        self.rank, self.world = rank, world
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []
        self.pos = 0
        self.epoch = 0

    def _take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.pos >= len(self.order):
                self.order = self.rng.permutation(len(self.examples)).tolist()
                self.pos = 0
                self.epoch += 1
            k = min(n - len(out), len(self.order) - self.pos)
            out.extend(self.order[self.pos : self.pos + k])
            self.pos += k
        return out

    def next_batch(self) -> Batch:
        idx = self._take(self.batch_size * self.world)
        mine = idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.collate([self.examples[i] for i in mine])

    def collate(self, examples: Sequence[Any]) -> Any:
        return collate(examples, self.pad_id)

    def fixed_batches(self, n: int | None = None) -> list[Batch]:
        """All examples (or the first n batches) in order: the val set."""
        chunks = [
            self.examples[i : i + self.batch_size]
            for i in range(0, len(self.examples), self.batch_size)
        ]
        return [self.collate(c) for c in chunks[:n]]

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "order": self.order,
            "pos": self.pos,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.pos, self.epoch = list(state["order"]), state["pos"], state["epoch"]


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
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
