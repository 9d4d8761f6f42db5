"""Server load: requests/s and latency of `lmpipe serve` at 1 and 16 concurrent clients.

The server is `lmpipe serve` in its own process (as deployed) on a free loopback port; clients
are threads of this process, each with its own HTTP connection, sending its next request as soon
as the last one returned (closed loop). Every request asks for `--max-tokens` tokens for one of
the eval prompts (`data/prepared/prompts/eval.jsonl`), sampled at temperature 1 with a seed per
request, so every configuration does the same work. Two server settings: `--max-batch 1` (one
request at a time on the model: the baseline) and the default batching of waiting requests.

    python bench/serve_load.py [--bundle models/onnx/rl] [--precision int8] [--requests 64]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bundle: str, precision: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lmpipe.cli", "serve", bundle, "--port", str(port),
           "--precision", precision, "--max-batch", str(max_batch),
           "--queue-limit", "64"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


def load(url: str, prompts: list[str], clients: int, total: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                        "temperature": 1.0, "seed": i}  # fmt: skip
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/completions", json=body)
                dt = time.perf_counter() - t0
                r.raise_for_status()
                with lock:
                    latencies.append(dt)
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20)
    return {"rps": total / wall, "tps": tokens[0] / wall, "p50": statistics.median(latencies),
            "p95": q[18]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="models/onnx/rl")
    ap.add_argument("--prompts", default="data/prepared/prompts/eval.jsonl")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"])
    ap.add_argument("--requests", type=int, default=64, help="requests per measurement")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line]
    prompts = [r["prompt"] for r in rows]
    print(f"{args.bundle} {args.precision}: {args.requests} requests per row, "
          f"max_tokens {args.max_tokens}, temperature 1, closed-loop clients")  # fmt: skip
    print(f"{'server':16s} {'clients':>7s} {'req/s':>7s} {'tokens/s':>9s} {'p50 ms':>8s} "
          f"{'p95 ms':>8s}")  # fmt: skip
    base: dict[int, float] = {}
    for max_batch in (1, 32):
        proc, url = start(args.bundle, args.precision, max_batch)
        try:
            load(url, prompts, 1, 4, args.max_tokens)  # warm-up
            for clients in (1, 16):
                m = load(url, prompts, clients, args.requests, args.max_tokens)
                base.setdefault(clients, m["rps"])
                name = "one at a time" if max_batch == 1 else f"batching ({max_batch})"
                print(f"{name:16s} {clients:7d} {m['rps']:7.1f} {m['tps']:9,.0f} "
                      f"{1000 * m['p50']:8.1f} {1000 * m['p95']:8.1f}   "
                      f"{m['rps'] / base[clients]:.2f}x req/s")  # fmt: skip
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
