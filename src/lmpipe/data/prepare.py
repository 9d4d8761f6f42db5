"""The prepare stage's work: documents → splits → tokenizer → token files → SFT pairs → prompts."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmpipe.config import BaseParams, DataParams, TokenizerParams
from lmpipe.data import sft, sources, stats
from lmpipe.data.tokenizer import (
    encode_documents,
    encode_with_eos,
    save_tokenizer,
    special_ids,
    token_dtype,
    train_tokenizer,
    write_tokens,
)
from lmpipe.io import write_json

STATS_MAX_DOCS = 20000
"""Corpus statistics use at most this many documents per split (a seeded sample)."""


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _sample(docs: Sequence[str], n: int, seed: int) -> list[str]:
    if len(docs) <= n:
        return list(docs)
    return random.Random(seed).sample(list(docs), n)


def answer(row: dict) -> str:
    """A pair's response, or a chat row's last assistant message."""
    if "messages" in row:
        return [m["content"] for m in row["messages"] if m["role"] == "assistant"][-1]
    return row["response"]


def corpus_stats(splits: dict[str, list[str]], pairs: Sequence[dict], seed: int) -> dict:
    """How hard the corpus is to memorise, and how much its continuations vary in sentiment."""
    train = _sample(splits["train"], STATS_MAX_DOCS, seed)
    val = _sample(splits["val"], STATS_MAX_DOCS, seed)
    return {
        "distinct_4gram_ratio": stats.distinct_ngram_ratio(train, 4),
        "val_8gram_in_train": stats.ngram_overlap(val, train, 8),
        "ending_sentiment": stats.sentiment_summary([answer(p) for p in pairs], seed=seed),
    }


def base_tokenizer(base_cfg: BaseParams, out: Path, root: str | Path = ".") -> Any:
    """Save the base model's tokenizer into `out` with the template the later stages use
    (`base.template`); return it as a `tokenizers.Tokenizer`."""
    from lmpipe import base as base_lib
    from lmpipe.chat import TEXT_TEMPLATE

    resolved = base_lib.resolve(base_cfg, root)
    assert resolved is not None
    hf = base_lib.load_tokenizer(resolved)
    own = hf.chat_template if isinstance(hf.chat_template, str) else None
    if base_cfg.template == "chat" and not own:
        raise base_lib.BaseError(
            f"base.template is chat but base.model {base_cfg.model!r} has no chat template: "
            "set base.template to auto or plain (prompt, blank line, answer)"
        )
    hf.chat_template = own if own and base_cfg.template != "plain" else TEXT_TEMPLATE
    if hf.pad_token is None:  # padding is carried by masks; the id only fills the slots
        hf.pad_token = hf.eos_token
    hf.save_pretrained(str(out))
    return hf.backend_tokenizer


def prepare(
    data: DataParams,
    tok_cfg: TokenizerParams,
    seed: int,
    out: Path,
    root: str | Path = ".",
    provenance: dict[str, Any] | None = None,
    base_cfg: BaseParams | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Write everything into `out`; return (report for reports/prepare.json, timings in seconds).

    With a base model (`base_cfg.model`) its tokenizer is used as it is (no BPE training).
    `provenance` (MLflow run id, params) is added to `meta.json`, the folder's manifest."""
    from lmpipe import base as base_lib
    from lmpipe.chat import load_template

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    raw = sources.load_documents(data, seed, root)
    docs, counts = sources.prepare_documents(raw, data)
    splits = sources.split_documents(docs, data.val_fraction, data.test_fraction, seed)
    timings["read_clean_split_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with_base = base_cfg is not None and bool(base_cfg.model)
    if with_base:
        tok = base_tokenizer(base_cfg, out, root)
    else:
        if base_cfg is not None and base_cfg.template == "chat":
            raise sources.DataError(
                "base.template is chat, but a model trained from scratch (base.model '') has "
                "lmpipe's own format: set base.template to auto or plain, or set base.model"
            )
        tok = train_tokenizer(
            splits["train"], tok_cfg.vocab_size, tok_cfg.min_frequency, len(splits["train"])
        )
        save_tokenizer(tok, out)
    template = load_template(out)
    timings["tokenizer_train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokens: dict[str, int] = {}
    chars: dict[str, int] = {}
    dtype = token_dtype(tok.get_vocab_size())
    for name, split_docs in splits.items():
        if with_base:
            arr = encode_with_eos(tok, split_docs, template.eos_id)
        else:
            arr = encode_documents(tok, split_docs)
        write_tokens(arr, out / f"{name}.bin")
        tokens[name] = int(arr.size)
        chars[name] = sum(len(d) for d in split_docs)
    timings["encode_s"] = time.perf_counter() - t0
    timings["encode_mb_per_sec"] = (
        sum(len(d.encode()) for d in docs) / 1e6 / max(timings["encode_s"], 1e-9)
    )

    t0 = time.perf_counter()
    pair_kw = {
        "prompt_sentences": data.prompt_sentences,
        "response_sentences": data.response_sentences,
        "max_prompt_chars": data.max_prompt_chars,
        "max_response_chars": data.max_response_chars,
    }
    if data.sft_path:
        sft_path = Path(data.sft_path)
        sft_path = sft_path if sft_path.is_absolute() else Path(root) / sft_path
        user = sft.read_pairs(sft_path, data.encoding, data.encoding_errors)
        pair_sets = sft.split_pairs(user, data.val_fraction, seed)
    else:
        pair_sets = {name: sft.build_pairs(splits[name], **pair_kw) for name in ("train", "val")}
    held = {name: sft.build_pairs(splits[name], **pair_kw) for name in ("val", "test")}
    for name, rows in [*pair_sets.items(), ("rl", held["val"]), ("eval", held["test"])]:
        if not rows:
            raise sources.DataError(
                f"no prompt/response pair could be made for {name}: documents need more than "
                f"data.prompt_sentences = {data.prompt_sentences} sentence(s) and a prompt of at "
                f"most data.max_prompt_chars = {data.max_prompt_chars} characters"
            )
    write_jsonl(out / "sft" / "train.jsonl", pair_sets["train"])
    write_jsonl(out / "sft" / "val.jsonl", pair_sets["val"])
    rl_prompts = sft.prompt_set(held["val"], data.rl_prompts)
    n_val = len(rl_prompts)
    # a small corpus: the reward model and RL need prompts more than a held-out set
    wanted = min(data.rl_prompts, data.rl_prompts_min)
    rl_prompts = sft.fill_prompts(rl_prompts, pair_sets["train"], wanted)
    n_from_train = len(rl_prompts) - n_val
    eval_prompts = sft.prompt_set(held["test"], data.eval_prompts)
    write_jsonl(out / "prompts" / "rl.jsonl", rl_prompts)
    write_jsonl(out / "prompts" / "eval.jsonl", eval_prompts)
    timings["pairs_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    corpus = corpus_stats(splits, held["test"] + pair_sets["train"], seed)
    timings["stats_s"] = time.perf_counter() - t0

    n_chars = sum(chars.values())
    n_tokens = sum(tokens.values())
    report = {
        "documents": {
            **{k: len(v) for k, v in splits.items()},
            "read": counts["read"],
            "duplicates_removed": counts["duplicates"],
            "too_short_removed": counts["too_short"],
        },
        "characters": chars,
        "tokens": tokens,
        "vocab_size": tok.get_vocab_size(),
        # BOS/EOS added per document are tokens too; count them so the ratio matches the files.
        "chars_per_token": round(n_chars / max(n_tokens, 1), 4),
        "sft_pairs": {k: len(v) for k, v in pair_sets.items()},
        "prompts": {
            "rl": len(rl_prompts),
            "rl_from_train": n_from_train,
            "eval": len(eval_prompts),
        },
        "corpus": corpus,
    }
    special = (
        {"bos": template.bos_id, "eos": template.eos_id, "pad": template.pad_id}
        if with_base
        else special_ids(tok)
    )
    report["template"] = {"kind": template.kind, "stop_ids": list(template.stop_ids)}
    meta = {
        "dtype": dtype.name,
        "vocab_size": tok.get_vocab_size(),
        "special_tokens": special,
        "template": report["template"],
        "base": base_lib.fingerprint(base_lib.resolve(base_cfg, root)) if with_base else None,
        "files": {name: f"{name}.bin" for name in splits},
        "source": {"source": data.source, "path": data.path},
        **{k: report[k] for k in ("documents", "tokens", "characters", "sft_pairs", "prompts")},
        **(provenance or {}),
    }
    write_json(out / "meta.json", meta)
    return report, timings
