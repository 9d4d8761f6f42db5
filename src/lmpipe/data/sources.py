"""Corpus sources (builtin, text, jsonl, hf), cleanup, de-duplication and the document split."""

from __future__ import annotations

import glob
import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from lmpipe.config import DataParams


class DataError(ValueError):
    """Bad input data; the message says which file, where, and what to change."""


# --------------------------------------------------------------------------- reading


def expand_paths(pattern: str, root: str | Path = ".") -> list[Path]:
    """Files matching a path or glob (relative to `root`), sorted; an error if none match."""
    pat = pattern if Path(pattern).is_absolute() else str(Path(root) / pattern)
    files = sorted(Path(p) for p in glob.glob(pat, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(
            f"data.path = {pattern!r} matches no file (looked in {Path(pat).parent.resolve()}); "
            "give an existing file or a glob such as 'corpus/*.txt'"
        )
    return files


def decode(data: bytes, encoding: str, errors: str, name: str) -> str:
    """Decode bytes; on undecodable bytes say how many, where, and what the option does."""
    try:
        return data.decode(encoding, errors=errors)
    except LookupError:
        raise DataError(f"data.encoding = {encoding!r} is not a known codec") from None
    except UnicodeDecodeError:
        pass
    # Locate every bad byte: surrogateescape maps each to one lone surrogate U+DC80..U+DCFF.
    text = data.decode(encoding, errors="surrogateescape")
    bad = [i for i, ch in enumerate(text) if "\udc80" <= ch <= "\udcff"]
    where = []
    for i in bad[:3]:
        line = text.count("\n", 0, i) + 1
        col = i - (text.rfind("\n", 0, i) + 1) + 1
        where.append(f"line {line} col {col} (byte 0x{ord(text[i]) - 0xDC00:02x})")
    raise DataError(
        f"{name}: {len(bad)} byte(s) are not valid {encoding}, first at {', '.join(where)}. "
        f"Fix the file, set data.encoding to its real encoding, or set data.encoding_errors to "
        "'replace' (each bad byte becomes U+FFFD) or 'ignore' (bad bytes are dropped)."
    )


def read_text(cfg: DataParams, root: str | Path = ".") -> list[str]:
    """Documents from text files: split by `cfg.separator`, or cut into `cfg.chunk_chars` chunks."""
    docs: list[str] = []
    sep = re.compile(cfg.separator)
    for f in expand_paths(cfg.path, root):
        text = decode(f.read_bytes(), cfg.encoding, cfg.encoding_errors, str(f))
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if cfg.chunk_chars:
            docs.extend(chunk_text(text, cfg.chunk_chars))
        else:
            docs.extend(sep.split(text))
    return docs


def chunk_text(text: str, size: int) -> list[str]:
    """Cut text into pieces of about `size` characters, ending at whitespace where possible."""
    out, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind(" ", start + size // 2, end)
            cut = max(cut, text.rfind("\n", start + size // 2, end))
            end = cut if cut > start else end
        out.append(text[start:end])
        start = end
    return out


def read_jsonl(cfg: DataParams, root: str | Path = ".") -> list[str]:
    """The `cfg.field` of every row of JSONL files; a bad row names file and line."""
    docs = []
    for f in expand_paths(cfg.path, root):
        text = decode(f.read_bytes(), cfg.encoding, cfg.encoding_errors, str(f))
        docs.extend(r[cfg.field] for r in iter_jsonl(text, str(f), [cfg.field], "data.field"))
    return docs


def iter_jsonl(text: str, name: str, fields: Sequence[str], option: str, first_line: int = 1):
    """Yield rows that are objects with string `fields`; raise DataError naming file:line."""
    for n, line in enumerate(text.splitlines(), first_line):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{name}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{name}:{n}: expected a JSON object, got {type(row).__name__}")
        for field in fields:
            if field not in row:
                keys = ", ".join(map(str, row)) or "none"
                raise DataError(
                    f"{name}:{n}: no field {field!r} (this row has: {keys}); "
                    f"fix the row or set {option}"
                )
            if not isinstance(row[field], str):
                raise DataError(
                    f"{name}:{n}: field {field!r} must be a string, got {type(row[field]).__name__}"
                )
        yield row


def read_hf(cfg: DataParams, root: str | Path = ".") -> list[str]:
    """`datasets.load_from_disk` when `cfg.path` is a saved dataset, else `load_dataset`."""
    import datasets

    local = Path(cfg.path) if Path(cfg.path).is_absolute() else Path(root) / cfg.path
    try:
        if local.is_dir() and (
            (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()
        ):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.hf_split not in ds:
                    raise DataError(
                        f"data.hf_split = {cfg.hf_split!r} is not in {local} "
                        f"(splits: {', '.join(ds)})"
                    )
                ds = ds[cfg.hf_split]
        else:
            ds = datasets.load_dataset(cfg.path, cfg.hf_config, split=cfg.hf_split)
    except DataError:
        raise
    except Exception as err:  # hub, network and format errors all land here
        raise DataError(
            f"cannot load dataset data.path = {cfg.path!r} (config {cfg.hf_config!r}, split "
            f"{cfg.hf_split!r}): {type(err).__name__}: {err}"
        ) from None
    if cfg.field not in ds.column_names:
        raise DataError(
            f"data.field = {cfg.field!r} is not a column of {cfg.path} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    return [t for t in ds[cfg.field] if isinstance(t, str)]


def load_documents(cfg: DataParams, seed: int, root: str | Path = ".") -> list[str]:
    """Raw documents from the configured source."""
    if cfg.source == "builtin":
        from lmpipe.data.builtin import generate_stories

        return generate_stories(cfg.builtin_stories, seed)
    if cfg.source == "text":
        return read_text(cfg, root)
    if cfg.source == "jsonl":
        return read_jsonl(cfg, root)
    return read_hf(cfg, root)


# --------------------------------------------------------------------------- cleanup

_SPACES = re.compile(r"[^\S\n]+")  # whitespace runs other than newlines
# Unicode category Cc (C0 and C1 controls, DEL) except tab and newline, and lone surrogates (Cs).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_MANY_NL = re.compile(r"\n{3,}")


def clean(text: str, form: str = "NFC") -> str:
    """Unicode-normalise, drop control characters, collapse spaces, trim lines and ends."""
    if form != "none":
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _MANY_NL.sub("\n\n", text).strip()


def dedupe(docs: Sequence[str]) -> list[str]:
    """Drop exact duplicates, keeping the first occurrence and the order."""
    seen: set[bytes] = set()
    out = []
    for d in docs:
        h = hashlib.blake2b(d.encode("utf-8"), digest_size=16).digest()
        if h not in seen:
            seen.add(h)
            out.append(d)
    return out


def split_documents(
    docs: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Seeded shuffle, then train/val/test by document. Every split must be non-empty."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = round(len(docs) * val_fraction)
    n_test = round(len(docs) * test_fraction)
    n_train = len(docs) - n_val - n_test
    if min(n_val, n_test, n_train) < 1:
        raise DataError(
            f"{len(docs)} documents with data.val_fraction = {val_fraction} and "
            f"data.test_fraction = {test_fraction} leave a split empty (train {n_train}, "
            f"val {n_val}, test {n_test}); add documents or raise the fractions"
        )
    pick = [docs[i] for i in order]
    return {
        "train": pick[:n_train],
        "val": pick[n_train : n_train + n_val],
        "test": pick[n_train + n_val :],
    }


def prepare_documents(raw: Sequence[str], cfg: DataParams) -> tuple[list[str], dict[str, int]]:
    """Clean, filter short documents, de-duplicate, cap; return docs and counts of what dropped."""
    if not raw:
        raise DataError(f"data.source = {cfg.source!r} produced no documents")
    cleaned = [clean(d, cfg.unicode_form) for d in raw]
    long_enough = [d for d in cleaned if len(d) >= cfg.min_chars]
    unique = dedupe(long_enough)
    counts = {
        "read": len(raw),
        "too_short": len(cleaned) - len(long_enough),
        "duplicates": len(long_enough) - len(unique),
    }
    if len(unique) < 3:
        raise DataError(
            f"only {len(unique)} distinct document(s) left after cleanup ({counts['read']} read, "
            f"{counts['too_short']} shorter than data.min_chars = {cfg.min_chars}, "
            f"{counts['duplicates']} exact duplicates); train/val/test need at least 3"
        )
    if cfg.max_docs:
        unique = unique[: cfg.max_docs]
    counts["kept"] = len(unique)
    return unique, counts
