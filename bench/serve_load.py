"""Server load: throughput at 1 and 16 clients, then hostile traffic against `lmpipe serve`.

The server is `lmpipe serve` in its own process (as deployed) on a free loopback port; clients
are threads of this process, each with its own HTTP connection.

Throughput: each client sends its next request as soon as the last one returned (closed loop).
Every request asks for `--max-tokens` tokens for one of the eval prompts
(`data/prepared/prompts/eval.jsonl`), sampled at temperature 1 with a seed per request, so every
configuration does the same work. Two server settings: `--max-batch 1` (one request at a time on
the model: the baseline) and the default batching of waiting requests.

Hostile (the server's default limits): valid requests from 8 clients run throughout, while
(1) 96 streaming requests are abandoned — reset right after sending, closed after the first
chunk, or cut off mid-upload — then the capacity `/health` reports once the server is idle;
(2) a storm of oversized requests (2 MB bodies: 413; 900 KB prompts with n = 8, within the body
limit: 400 on characters) while a probe times `GET /health`. Printed: capacity after the aborts,
`/health` latency during the storm, and the count of each status (5xx must be 0).
Every loop is bounded; nothing leaves the loopback interface.

    python bench/serve_load.py [--bundle models/onnx/rl] [--precision int8] [--requests 64]
    python bench/serve_load.py --random-bundle --part hostile   # no pipeline run needed
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from _results import add_json_arg, write


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bundle: str, precision: str, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lmpipe.cli",
        "serve",
        bundle,
        "--port",
        str(port),
        "--precision",
        precision,
        *flags,
    ]
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


def random_bundle(folder: Path) -> tuple[str, list[str]]:
    """A bundle of the default model shape (params.yaml's `model`, a 4096-token BPE) with random
    weights, and prompts from the built-in stories: the same compute as a trained model's."""
    from lmpipe.config import ModelParams
    from lmpipe.data.builtin import generate_stories
    from lmpipe.data.tokenizer import special_ids, train_tokenizer
    from lmpipe.model import build_model
    from lmpipe.onnx.export import build_bundle

    stories = generate_stories(2000, seed=0)
    tok = train_tokenizer(stories, 4096)
    tok.save(str(folder / "tokenizer.json"))
    ids = special_ids(tok)
    model = build_model(ModelParams(), tok.get_vocab_size(), ids, seed=0).eval()
    short = {k.strip("<|>"): v for k, v in ids.items()}
    build_bundle(
        model,
        folder / "random",
        tokenizer_file=folder / "tokenizer.json",
        special_tokens=short,
        generation={"max_new_tokens": 32},
        source={"variant": "random"},
        int8=True,
    )
    return str(folder / "random"), [st.split(". ")[0] + "." for st in stories[:64]]


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
                body = {
                    "prompt": prompts[i % len(prompts)],
                    "max_tokens": max_tokens,
                    "temperature": 1.0,
                    "seed": i,
                }
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
    return {
        "rps": total / wall,
        "tps": tokens[0] / wall,
        "p50": statistics.median(latencies),
        "p95": q[18],
    }


class Statuses:
    """Status codes seen, by phase (thread-safe)."""

    def __init__(self) -> None:
        self.lock, self.counts = threading.Lock(), {}

    def add(self, phase: str, status: int | str) -> None:
        with self.lock:
            key = (phase, status)
            self.counts[key] = self.counts.get(key, 0) + 1

    def line(self, phase: str) -> str:
        got = sorted((str(k[1]), v) for k, v in self.counts.items() if k[0] == phase)
        return ", ".join(f"{k}: {v}" for k, v in got) or "none"

    def server_errors(self) -> int:
        return sum(v for (_, k), v in self.counts.items() if isinstance(k, int) and k >= 500)


def raw_request(port: int, body: bytes, send: int | None = None) -> socket.socket:
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        f"application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head + body[: len(body) if send is None else send])
    return s


def reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def abandon(port: int, i: int, prompt: str) -> None:
    """One streaming request left at one of three points (i % 3)."""
    body = json.dumps({"prompt": prompt, "max_tokens": 64, "stream": True, "seed": i}).encode()
    s = raw_request(port, body, send=len(body) // 2 if i % 3 == 2 else None)
    try:
        if i % 3 == 1:  # after the first chunk (or the 429)
            s.recv(4096)
    except OSError:
        pass
    reset(s)


def steady(url: str, prompts: list[str], stop: threading.Event, seen: Statuses, phase) -> None:
    """Valid requests, one after the other, until `stop` (each bounded by its token budget)."""
    with httpx.Client(timeout=120) as http:
        i = 0
        while not stop.is_set() and i < 10_000:
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": 16, "seed": i}
            try:
                status = http.post(f"{url}/v1/completions", json=body).status_code
            except httpx.TransportError as err:
                status = type(err).__name__
            seen.add(f"valid-{phase[0]}", status)
            i += 1


def oversized(url: str, bodies: list[bytes], seen: Statuses) -> None:
    with httpx.Client(timeout=120) as http:
        for body in bodies:
            try:
                r = http.post(
                    f"{url}/v1/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                seen.add("storm", r.status_code)
            except httpx.TransportError as err:
                seen.add("storm", type(err).__name__)


def probe_health(url: str, most: int, while_=None, seen: Statuses | None = None) -> list[float]:
    """Latencies of GET /health, one every 10 ms: `most` probes, fewer if `while_()` turns
    false first."""
    latencies: list[float] = []
    with httpx.Client(timeout=30) as probe:
        while len(latencies) < most and (while_ is None or while_()):
            t1 = time.perf_counter()
            r = probe.get(f"{url}/health")
            latencies.append(time.perf_counter() - t1)
            if seen is not None:
                seen.add("health", r.status_code)
            time.sleep(0.01)
    return latencies


def hostile(url: str, prompts: list[str]) -> None:
    port = int(url.rsplit(":", 1)[1])
    seen, stop, phase = Statuses(), threading.Event(), ["aborts"]
    valid = [
        threading.Thread(target=steady, args=(url, prompts, stop, seen, phase)) for _ in range(8)
    ]
    for t in valid:
        t.start()
    # (1) abandoned streams, 96 of them, 16 at a time
    for wave in range(6):
        threads = [
            threading.Thread(target=abandon, args=(port, 16 * wave + k, prompts[k]))
            for k in range(16)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    phase[0] = "storm"
    quiet = probe_health(url, 50)  # the valid load alone, for comparison
    # (2) the storm: 2 MB bodies (413) and 900 KB prompts with n = 8 (400), 8 senders each
    big = json.dumps({"prompt": "a" * 2_000_000, "max_tokens": 16}).encode()
    long = json.dumps({"prompt": "word " * 180_000, "n": 8, "max_tokens": 16}).encode()
    senders = [
        threading.Thread(target=oversized, args=(url, [big if k % 2 else long] * 12, seen))
        for k in range(16)
    ]
    t0 = time.perf_counter()
    for t in senders:
        t.start()
    latencies = probe_health(url, 20_000, lambda: any(t.is_alive() for t in senders), seen)
    storm_s = time.perf_counter() - t0
    for t in senders:
        t.join()
    phase[0] = "after"
    stop.set()
    for t in valid:
        t.join()
    for _ in range(600):  # idle: every slot must be back
        health = httpx.get(f"{url}/health").json()
        if health["in_use"] == 0:
            break
        time.sleep(0.05)
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    base = statistics.quantiles(quiet, n=100, method="inclusive")
    print(
        f"capacity after 96 abandoned streams: {health['free']}/{health['capacity']} free "
        f"(status {health['status']})"
    )
    print(
        f"storm: 96 × 2 MB bodies + 96 × 900 KB prompts (n = 8) in {storm_s:.1f} s: "
        f"{seen.line('storm')}"
    )
    print(
        f"/health with the 8 valid clients only ({len(quiet)} probes): p50 "
        f"{1000 * base[49]:.1f} ms, p99 {1000 * base[98]:.1f} ms"
    )
    print(
        f"/health during the storm ({len(latencies)} probes): p50 {1000 * q[49]:.1f} ms, "
        f"p99 {1000 * q[98]:.1f} ms, max {1000 * max(latencies):.1f} ms; "
        f"{seen.line('health')}"
    )
    print(
        f"valid requests (8 clients): during the aborts {seen.line('valid-aborts')}; during "
        f"the storm {seen.line('valid-storm')}"
    )
    print(f"5xx responses: {seen.server_errors()}")


def throughput(args, prompts: list[str]) -> None:
    print(
        f"{args.bundle} {args.precision}: {args.requests} requests per row, "
        f"max_tokens {args.max_tokens}, temperature 1, closed-loop clients"
    )
    print(
        f"{'server':16s} {'clients':>7s} {'req/s':>7s} {'tokens/s':>9s} {'p50 ms':>8s} "
        f"{'p95 ms':>8s}"
    )
    base: dict[int, float] = {}
    rows = []
    for max_batch in (1, 32):
        proc, url = start(
            args.bundle, args.precision, "--max-batch", str(max_batch), "--queue-limit", "64"
        )
        try:
            load(url, prompts, 1, 4, args.max_tokens)  # warm-up
            for clients in (1, 16):
                m = load(url, prompts, clients, args.requests, args.max_tokens)
                base.setdefault(clients, m["rps"])
                name = "one at a time" if max_batch == 1 else f"batching ({max_batch})"
                print(
                    f"{name:16s} {clients:7d} {m['rps']:7.1f} {m['tps']:9,.0f} "
                    f"{1000 * m['p50']:8.1f} {1000 * m['p95']:8.1f}   "
                    f"{m['rps'] / base[clients]:.2f}x req/s"
                )
                rows.append(
                    {
                        "server": name,
                        "clients": clients,
                        "rps": m["rps"],
                        "tps": m["tps"],
                        "p50_ms": 1000 * m["p50"],
                        "p95_ms": 1000 * m["p95"],
                        "vs_one": m["rps"] / base[clients],
                    }
                )
        finally:
            proc.terminate()
            proc.wait()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="models/onnx/rl")
    ap.add_argument("--prompts", default="data/prepared/prompts/eval.jsonl")
    ap.add_argument(
        "--random-bundle",
        action="store_true",
        help="serve a random-weight bundle of the default shape (built in a temp dir)",
    )
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"])
    ap.add_argument("--part", default="all", choices=["all", "throughput", "hostile"])
    ap.add_argument("--requests", type=int, default=64, help="requests per measurement")
    ap.add_argument("--max-tokens", type=int, default=32)
    add_json_arg(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_bundle:
            args.bundle, prompts = random_bundle(Path(tmp))
        else:
            rows = [json.loads(ln) for ln in Path(args.prompts).read_text().splitlines() if ln]
            prompts = [r["prompt"] for r in rows]
        if args.part in ("all", "throughput"):
            rows = throughput(args, prompts)
            write(
                args.json,
                {
                    "bundle": "random" if args.random_bundle else args.bundle,
                    "precision": args.precision,
                    "requests": args.requests,
                    "max_tokens": args.max_tokens,
                    "rows": rows,
                },
            )
        if args.part in ("all", "hostile"):
            proc, url = start(args.bundle, args.precision)
            try:
                hostile(url, prompts)
            finally:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
