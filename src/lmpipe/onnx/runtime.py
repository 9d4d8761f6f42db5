"""Generation from an exported bundle with onnxruntime, numpy and tokenizers — no torch.

A bundle (`models/onnx/<variant>/`) holds `model.onnx` (fp32, graph-optimised), optionally
`model.int8.onnx` (int8 weights, for CPUs) and `model.fp16.onnx` (for the CUDA provider),
`tokenizer.json`, the chat template when the model has one (`chat_template.jinja`,
`tokenizer_config.json`) and `bundle.json` (input/output names, cache shapes, special and stop
token ids, generation defaults, hashes and lineage). One decoder graph serves prefill and decode:
inputs `input_ids`, `attention_mask`, `position_ids` and `past.<i>.key|value`, outputs `logits` and
`present.<i>.key|value`. Prefill passes an empty cache (past length 0). `bundle` reads the
manifest, `sampling` picks each token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmpipe.onnx.bundle import BundleError, read_bundle
from lmpipe.onnx.sampling import next_tokens

if TYPE_CHECKING:
    from lmpipe.chat import ChatTemplate


def left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists right-aligned in one int64 batch, and the attention mask (0 on padding)."""
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


@dataclass
class Row:
    """How one row of a batch is generated."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    rng: np.random.Generator = field(default_factory=np.random.default_rng)


@dataclass
class Step:
    tokens: np.ndarray  # (rows,) the token each row emitted at this step (PAD once it ended)
    live: np.ndarray  # (rows,) bool, False once a row ended; the caller may clear entries
    index: int  # tokens generated so far, this step included


@dataclass
class Generated:
    tokens: list[list[int]]  # response token ids, the stop token excluded
    finish_reason: list[str]  # "stop" (a stop token) or "length"


class OnnxLM:
    """A bundle's decoder in an onnxruntime session (CUDA when onnxruntime-gpu sees a GPU)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        precision: str = "fp32",
        providers: Sequence[str] | None = None,
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        self.dir = Path(directory)
        self.meta = read_bundle(self.dir)
        name = self.meta["files"].get(precision)
        if name is None or not (self.dir / name).exists():
            have = [k for k, v in self.meta["files"].items() if v and (self.dir / v).exists()]
            raise BundleError(
                f"{self.dir} has no {precision} model file (it has: {', '.join(have) or 'none'})"
            )
        self.precision = precision
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

    @cached_property
    def template(self) -> ChatTemplate | None:
        """The bundle's chat template (lmpipe's one-turn format for an lmpipe bundle exported
        before templates were bundled), or None for a tokenizer with neither (prompts then take
        the plain format from `special_tokens`). TemplateError if its files are broken."""
        from lmpipe.chat import load_template

        return load_template(self.dir, required=False)

    @cached_property
    def _literal(self):
        """The tokenizer with special-token markers matched as plain text (for user text)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self.tokenizer.to_str())
        tok.encode_special_tokens = True
        return tok

    @cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a row: `bundle.json`'s stop ids (EOS for older bundles) and the chat
        template's EOS and end-of-turn token."""
        ids = list(self.meta.get("stop_ids") or [self.special["eos"]])
        if self.template is not None:
            ids += self.template.stop_ids
        return tuple(dict.fromkeys(int(i) for i in ids))

    def prompt_ids(self, prompt: str) -> list[int]:
        """One user turn and the generation prompt, through the bundle's chat template, else in
        the plain format BOS PROMPT <prompt> RESPONSE. The prompt is encoded as text: markers
        such as `<|eos|>` in it never become control tokens."""
        if self.template is not None:
            return self.template.prompt_ids(prompt)
        s = self.special
        body = self._literal.encode(prompt, add_special_tokens=False).ids
        return [s["bos"], s["prompt"], *body, s["response"]]

    def chat_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """A conversation through the chat template, ending in the generation prompt
        (TemplateError if the bundle has no template or the messages do not fit it)."""
        from lmpipe.chat import TemplateError

        if self.template is None:
            raise TemplateError(
                f"{self.dir} has no chat template (no chat_template.jinja or tokenizer_config.json"
                " with one): re-export it from a model folder that has one, or send a plain prompt"
            )
        return self.template.encode(messages, add_generation_prompt=True).ids

    def check_lengths(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width, context = max(map(len, prompts)), self.meta["context"]
        if width + max_new_tokens > context:
            raise ValueError(
                f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {context} tokens"
            )

    def stream_rows(self, prompts: Sequence[Sequence[int]], rows: Sequence[Row]) -> Iterator[Step]:
        """Batched generation where every row has its own sampling settings, token budget and
        random generator (rows that share a generator and settings draw together, in row order).
        Left-padded prefill, then one decode pass per token; rows that ended are dropped from the
        batch so they cost nothing. Yields a `Step` per token: `tokens[i]` is row i's new token
        where `live[i]`, and the caller may set `live[i] = False` to end row i early (a stop
        string, a client gone). A row ends at any of `stop_ids` (its token is then that stop id)
        or at its budget. Ends when every row has ended."""
        if len(rows) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(rows)} row settings")
        self.check_lengths(prompts, max(r.max_new_tokens for r in rows))
        pad, stops = self.special["pad"], np.array(self.stop_ids)
        b = len(prompts)
        ids, mask = left_pad(prompts, pad)
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        logits, past = self.forward(ids, mask, pos, self.empty_cache(b))
        logits = logits[:, -1]
        next_pos = mask.sum(-1, keepdims=True)
        groups: dict[tuple, list[int]] = {}  # rows drawing together from one generator
        for i, r in enumerate(rows):
            groups.setdefault((id(r.rng), r.temperature, r.top_k, r.top_p), []).append(i)
        budget = np.array([r.max_new_tokens for r in rows])
        active = np.arange(b)  # the original row of each batch position
        live = np.ones(b, dtype=bool)
        step = Step(np.full(b, pad, dtype=np.int64), live, 0)
        while True:
            pick = np.full(b, pad, dtype=np.int64)
            where = np.full(b, -1)
            where[active] = np.arange(len(active))
            for members in groups.values():
                members = [i for i in members if live[i]]
                if members:
                    r = rows[members[0]]
                    drawn = next_tokens(
                        logits[where[members]], r.rng, r.temperature, r.top_k, r.top_p
                    )
                    pick[members] = drawn
            step.tokens = np.where(live, pick, pad)
            live &= ~np.isin(step.tokens, stops)
            step.index += 1
            yield step  # the caller may end rows here
            live &= budget > step.index
            keep = live[active]
            if not keep.any():
                return
            tok = step.tokens[active][keep]
            if not keep.all():  # drop ended rows from the batch
                active = active[keep]
                mask, next_pos = mask[keep], next_pos[keep]
                past = {k: v[keep] for k, v in past.items()}
            mask = np.concatenate([mask, np.ones((len(active), 1), dtype=np.int64)], 1)
            logits, past = self.forward(tok[:, None], mask, next_pos, past)
            logits = logits[:, -1]
            next_pos = next_pos + 1

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
        """Every row with the same settings and one generator: yields (tokens, live) per step;
        `live[i]` is False once row i emitted a stop token (its token is then that token, or PAD
        after it)."""
        rng = np.random.default_rng(seed)
        rows = [Row(max_new_tokens, temperature, top_k, top_p, rng)] * len(prompts)
        for step in self.stream_rows(prompts, rows):
            yield step.tokens, step.live.copy()

    def generate_ids(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, **sampling: Any
    ) -> Generated:
        """Response tokens per prompt (the stop token excluded) and why each stopped."""
        out: list[list[int]] = [[] for _ in prompts]
        live = np.ones(len(prompts), dtype=bool)
        for tok, now in self.stream_ids(prompts, max_new_tokens=max_new_tokens, **sampling):
            for i in np.flatnonzero(now):
                out[i].append(int(tok[i]))
            live = now
        return Generated(out, ["length" if lv else "stop" for lv in live])

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)
