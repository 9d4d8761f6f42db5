"""SFT: pairs and conversations in the chat template, padded batches with loss on the answers
only, sampling.

A pair is rendered as the prompt with the generation prompt (`ChatTemplate.prompt_ids`), then
the answer and the end-of-turn token; with lmpipe's plain template that is
`BOS PROMPT <prompt> RESPONSE <response> EOS`. Labels are IGNORE on the prompt, the template's
markers and padding; the answer's tokens and its end-of-turn token carry the loss, so the model
learns what to say and when to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmpipe.chat import ChatTemplate
from lmpipe.progress import Progress
from lmpipe.sampling import generate
from lmpipe.train import IGNORE, Batch


def prompt_ids(template: ChatTemplate, prompt: str) -> list[int]:
    """Token ids of a prompt in the template, ending with the generation prompt."""
    return template.prompt_ids(prompt)


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


def encode_pair(template: ChatTemplate, prompt: str, response: str, context: int) -> Example | None:
    """One training example, or None when the prompt alone does not fit the context."""
    return example(*template.pair(prompt, response), context)


def encode_row(template: ChatTemplate, row: dict, context: int) -> Example | None:
    """A `{"prompt", "response"}` pair or a `{"messages": [...]}` conversation (loss on every
    assistant turn)."""
    if "messages" in row:
        return example(*template.conversation(row["messages"]), context)
    return encode_pair(template, row["prompt"], row["response"], context)


def encode_pairs(template: ChatTemplate, pairs: Sequence[dict], context: int) -> list[Example]:
    out = [e for p in pairs if (e := encode_row(template, p, context))]
    if not out:
        raise ValueError(f"no SFT pair fits model.context = {context}; raise it or shorten pairs")
    return out


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


def sample_responses(
    model: torch.nn.Module,
    template: ChatTemplate,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Ancestral samples (see `lmpipe.sampling.generate`) for text prompts, seeded.

    Returns `{"prompt", "response", "ended_with_eos", "n_tokens"}` per prompt.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out: list[dict[str, Any]] = []
    bar = Progress(len(prompts), "sampling: prompts")
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        g = generate(
            model, [template.prompt_ids(p) for p in chunk], max_new_tokens=max_new_tokens,
            eos_id=template.stop_ids, pad_id=template.pad_id, temperature=temperature,
            generator=gen,
        )  # fmt: skip
        lengths = g.lengths.tolist()
        for p, row, ended, n in zip(
            chunk, g.response.tolist(), g.ended.tolist(), lengths, strict=True
        ):
            out.append(
                {
                    "prompt": p,
                    "response": template.decode(row[:n]),
                    "ended_with_eos": ended,
                    "n_tokens": n,
                }
            )
        bar.update(len(chunk))
    bar.close()
    return out
