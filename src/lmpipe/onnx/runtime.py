"""Generation from an exported bundle with onnxruntime, numpy and tokenizers — no torch.

A bundle (`models/onnx/<variant>/`) holds `model.onnx` (fp32, graph-optimised), optionally
`model.int8.onnx`, `tokenizer.json` and `bundle.json` (input/output names, cache shapes, special
token ids, generation defaults, hashes and lineage). One decoder graph serves prefill and decode:
inputs `input_ids`, `attention_mask`, `position_ids` and `past.<i>.key|value`, outputs `logits` and
`present.<i>.key|value`. Prefill passes an empty cache (past length 0).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "bundle.json"


class BundleError(ValueError):
    """The folder is not a usable bundle; the message says what is missing."""


def read_bundle(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise BundleError(f"{directory} is not an lmpipe ONNX bundle (no {MANIFEST}); run export")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- sampling


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Rows of logits with everything outside the top-k and outside the smallest set whose
    probability reaches top_p set to −inf (the most likely token always stays)."""
    out = logits.astype(np.float64, copy=True)
    if top_k and top_k < out.shape[-1]:
        kth = np.partition(out, -top_k, axis=-1)[:, -top_k][:, None]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-out, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(softmax(out), order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p  # mass strictly before each token
        drop_sorted = before >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        out[drop] = -np.inf
    return out


def next_tokens(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> np.ndarray:
    """One token per row: greedy when temperature is 0, else a draw from the filtered,
    temperature-scaled distribution."""
    if temperature == 0:
        return logits.argmax(-1)
    p = softmax(filter_logits(logits / temperature, top_k, top_p))
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)


# ----------------------------------------------------------------------------- the model


@dataclass
class Generated:
    tokens: list[list[int]]  # response token ids, EOS excluded
    finish_reason: list[str]  # "stop" (EOS or a stop string) or "length"


class OnnxLM:
    """A bundle's decoder in an onnxruntime session (CUDA when onnxruntime-gpu sees a GPU)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        int8: bool = False,
        providers: Sequence[str] | None = None,
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        self.dir = Path(directory)
        self.meta = read_bundle(self.dir)
        name = self.meta["files"]["int8" if int8 else "fp32"]
        if name is None or not (self.dir / name).exists():
            raise BundleError(f"{self.dir} has no {'int8' if int8 else 'fp32'} model file")
        if providers is None:
            avail = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.dir / name), opts, providers=list(providers))
        self.cache = self.meta["cache"]  # layers, kv_heads, head_dim
        self.past_names = [
            f"past.{i}.{k}" for i in range(self.cache["layers"]) for k in ("key", "value")
        ]
        self.special = self.meta["special_tokens"]
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        return self._tok

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        c = self.cache
        shape = (batch, c["kv_heads"], 0, c["head_dim"])
        return {n: np.zeros(shape, dtype=np.float32) for n in self.past_names}

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: dict[str, np.ndarray],
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(logits, present) for new tokens given the cache of the earlier ones."""
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": position_ids.astype(np.int64),
            **past,
        }
        out = self.session.run(None, feeds)
        return out[0], dict(zip(self.past_names, out[1:], strict=True))

    def prompt_ids(self, prompt: str) -> list[int]:
        """The chat template of the pipeline: BOS PROMPT <prompt> RESPONSE."""
        s = self.special
        body = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return [s["bos"], s["prompt"], *body, s["response"]]

    def check_lengths(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width, context = max(map(len, prompts)), self.meta["context"]
        if width + max_new_tokens > context:
            raise ValueError(
                f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {context} tokens"
            )

    def stream_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batched generation, one step at a time: left-padded prefill, then one decode pass per
        token. Yields (tokens, live) per step: `live[i]` is False once row i emitted EOS (its
        token is then EOS, or PAD after it). Stops when every row ended or at max_new_tokens."""
        self.check_lengths(prompts, max_new_tokens)
        pad, eos = self.special["pad"], self.special["eos"]
        b, width = len(prompts), max(map(len, prompts))
        ids = np.full((b, width), pad, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        rng = np.random.default_rng(seed)
        logits, past = self.forward(ids, mask, pos, self.empty_cache(b))
        next_pos = mask.sum(-1, keepdims=True)
        live = np.ones(b, dtype=bool)
        for step in range(max_new_tokens):
            tok = np.where(live, next_tokens(logits[:, -1], rng, temperature, top_k, top_p), pad)
            live = live & (tok != eos)
            yield tok, live
            if not live.any() or step == max_new_tokens - 1:
                return
            mask = np.concatenate([mask, live.astype(np.int64)[:, None]], 1)
            logits, past = self.forward(tok[:, None], mask, next_pos, past)
            next_pos = next_pos + 1

    def generate_ids(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, **sampling: Any
    ) -> Generated:
        """Response tokens per prompt (EOS excluded) and why each stopped."""
        out: list[list[int]] = [[] for _ in prompts]
        live = np.ones(len(prompts), dtype=bool)
        for tok, now in self.stream_ids(prompts, max_new_tokens=max_new_tokens, **sampling):
            for i in np.flatnonzero(now):
                out[i].append(int(tok[i]))
            live = now
        return Generated(out, ["length" if lv else "stop" for lv in live])

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)
