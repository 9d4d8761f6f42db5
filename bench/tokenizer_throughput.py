"""Tokenizer training and encoding throughput (MB/s) on the built-in corpus or a text file.

    python bench/tokenizer_throughput.py                       # builtin corpus, default size
    python bench/tokenizer_throughput.py --file ../shared/corpora/tinyshakespeare.txt

Prints MB of UTF-8 text per second for BPE training, for batched encoding (the Rust encoder's
thread pool, what the prepare stage uses), and for one-document-at-a-time encoding as a baseline
run in the same process.
"""

from __future__ import annotations

import argparse
import os
import re
import time

from _results import add_json_arg, write
from lmpipe.data.builtin import generate_stories
from lmpipe.data.tokenizer import encode_documents, train_tokenizer


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", default=None, help="text file (documents split on blank lines)")
    ap.add_argument("--stories", type=int, default=20000, help="builtin corpus size")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    add_json_arg(ap)
    args = ap.parse_args()

    if args.file:
        with open(args.file, encoding="utf-8") as f:
            docs = [d for d in re.split(r"\n\s*\n", f.read()) if d.strip()]
        name = os.path.basename(args.file)
    else:
        t0 = time.perf_counter()
        docs = generate_stories(args.stories, seed=1337)
        print(f"builtin corpus: {len(docs)} stories in {time.perf_counter() - t0:.2f}s")
        name = f"builtin ({args.stories} stories)"
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"corpus: {name}, {len(docs)} documents, {mb:.2f} MB, cpus={os.cpu_count()}")

    tok = None

    def train():
        nonlocal tok
        tok = train_tokenizer(docs, args.vocab, 2, len(docs))

    t_train = best_of(train, args.repeats)
    t_batch = best_of(lambda: encode_documents(tok, docs), args.repeats)
    t_single = best_of(lambda: [tok.encode(d) for d in docs], 1)
    n_tokens = encode_documents(tok, docs).size
    print(f"train BPE (vocab {args.vocab}): {t_train:.2f}s  {mb / t_train:.1f} MB/s")
    print(
        f"encode batched:   {t_batch:.2f}s  {mb / t_batch:.1f} MB/s  "
        f"{n_tokens / t_batch / 1e6:.2f} M tokens/s"
    )
    print(f"encode one by one: {t_single:.2f}s  {mb / t_single:.1f} MB/s  (baseline)")
    print(f"batched / one-by-one: {t_single / t_batch:.2f}x; bytes/token {mb * 1e6 / n_tokens:.2f}")
    write(
        args.json,
        {
            "corpus": name,
            "documents": len(docs),
            "mb": mb,
            "vocab": args.vocab,
            "train_mb_s": mb / t_train,
            "batched_mb_s": mb / t_batch,
            "batched_mtokens_s": n_tokens / t_batch / 1e6,
            "single_mb_s": mb / t_single,
            "batched_over_single": t_single / t_batch,
            "bytes_per_token": mb * 1e6 / n_tokens,
            "table": [
                ["BPE training, MB/s", f"{mb / t_train:.1f}"],
                [
                    "batched encoding, MB/s (M tokens/s)",
                    f"{mb / t_batch:.1f} ({n_tokens / t_batch / 1e6:.2f})",
                ],
                ["one document at a time, MB/s", f"{mb / t_single:.1f}"],
                ["batched / one at a time", f"{t_single / t_batch:.2f}x"],
                ["bytes per token", f"{mb * 1e6 / n_tokens:.2f}"],
            ],
        },
    )


if __name__ == "__main__":
    main()
