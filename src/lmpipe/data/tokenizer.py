"""Byte-level BPE tokenizer training and token files (numpy memmaps)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmpipe.data.sources import DataError

PAD, BOS, EOS, PROMPT, RESPONSE = "<|pad|>", "<|bos|>", "<|eos|>", "<|prompt|>", "<|response|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, PROMPT, RESPONSE]
"""Ids 0..4 in this order. PAD differs from EOS, so masking padding never hides a real EOS."""


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: int | None = None
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation, lossless on any Unicode)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    got = tok.get_vocab_size()
    if got < vocab_size:
        raise DataError(
            f"tokenizer.vocab_size = {vocab_size} is larger than this corpus can fill: BPE stopped "
            f"at {got} tokens (no pair left seen >= tokenizer.min_frequency = {min_frequency} "
            f"times). Set tokenizer.vocab_size to at most {got}, lower min_frequency, or add text."
        )
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}


def to_hf(tok: Tokenizer):
    """Wrap as a `PreTrainedTokenizerFast` with BOS/EOS/PAD set (what models and TRL expect)."""
    from transformers import PreTrainedTokenizerFast

    from lmpipe.chat import PLAIN_TEMPLATE

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[PROMPT, RESPONSE],
        clean_up_tokenization_spaces=False,
        chat_template=PLAIN_TEMPLATE,
    )


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> None:
    """Write tokenizer.json, the HF config files and the chat template (lmpipe's one-turn format
    as Jinja), so `AutoTokenizer.from_pretrained(dir).apply_chat_template` works."""
    to_hf(tok).save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `dvc repro prepare` first")
    return Tokenizer.from_file(str(path))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def encode_documents(tok: Tokenizer, docs: Sequence[str], batch: int = 4096) -> np.ndarray:
    """One stream `BOS d1 EOS BOS d2 EOS ...` (batched, multi-threaded in the Rust encoder)."""
    ids = special_ids(tok)
    dtype = token_dtype(tok.get_vocab_size())
    stream: list[int] = []
    for start in range(0, len(docs), batch):
        for enc in tok.encode_batch(list(docs[start : start + batch]), add_special_tokens=False):
            stream.append(ids[BOS])
            stream.extend(enc.ids)
            stream.append(ids[EOS])
    return np.array(stream, dtype=dtype)


def encode_with_eos(tok: Tokenizer, docs: Sequence[str], eos_id: int, batch: int = 4096):
    """One stream `d1 EOS d2 EOS ...` in a pretrained tokenizer's own framing (its
    post-processor adds BOS where the model expects one), for continued pretraining."""
    dtype = token_dtype(tok.get_vocab_size())
    stream: list[int] = []
    for start in range(0, len(docs), batch):
        for enc in tok.encode_batch(list(docs[start : start + batch]), add_special_tokens=True):
            stream.extend(enc.ids)
            stream.append(eos_id)
    return np.array(stream, dtype=dtype)


def write_tokens(arr: np.ndarray, path: str | Path) -> None:
    """Raw little-endian array; read back with `read_tokens` (a memmap, nothing loaded)."""
    arr.astype(arr.dtype.newbyteorder("<"), copy=False).tofile(path)


def read_tokens(path: str | Path, dtype: str | np.dtype) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `dvc repro prepare` first")
    dtype = np.dtype(dtype).newbyteorder("<")
    if path.stat().st_size % dtype.itemsize:
        raise ValueError(f"{path} is truncated (size not a multiple of {dtype.itemsize})")
    return np.memmap(path, dtype=dtype, mode="r")
