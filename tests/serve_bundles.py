"""Bundles for the server's tests, and a real server in a thread.

The conftest `bundle` (a tiny random llama, vocabulary 300) is given other tokenizers: token ids
are all the model knows, so only the tokenizer files and `bundle.json`'s ids change. Each
tokenizer has special-token markers a prompt could try to type, and splits on punctuation, so a
marker typed as text becomes several plain tokens (`<`, `|`, …) instead of one control token.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from lmpipe.chat import PLAIN_TEMPLATE

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]  # ids 0..3
PLAIN_SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|prompt|>", "<|response|>"]  # ids 0..4


def _tokenizer(specials: list[str], words: list[str], path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*specials, "<unk>", *words])}
    vocab.update({f"w{i}": i for i in range(len(vocab), 300)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.add_special_tokens(specials)
    tok.save(str(path))


def derive(
    src: Path,
    dest: Path,
    specials: list[str],
    words: list[str],
    special_ids: dict[str, int],
    template: str | None = None,
    config: dict | None = None,
    stop_ids: list[int] | None = None,
) -> Path:
    shutil.copytree(src, dest)
    _tokenizer(specials, words, dest / "tokenizer.json")
    if template is not None:
        (dest / "chat_template.jinja").write_text(template)
    if config is not None:
        (dest / "tokenizer_config.json").write_text(json.dumps(config))
    meta = json.loads((dest / "bundle.json").read_text())
    meta["special_tokens"] = special_ids
    meta.pop("stop_ids", None)
    if stop_ids is not None:
        meta["stop_ids"] = stop_ids
    (dest / "bundle.json").write_text(json.dumps(meta))
    return dest


def chatml(src: Path, dest: Path) -> Path:
    """A ChatML template: EOS `<|endoftext|>` (3), end of turn `<|im_end|>` (2)."""
    config = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    return derive(
        src,
        dest,
        CHATML_SPECIALS,
        ["user", "assistant", "system"],
        {"bos": 1, "eos": 3, "pad": 0},
        CHATML,
        config,
        [3, 2],
    )


def plain(src: Path, dest: Path) -> Path:
    """lmpipe's from-scratch format as its chat template (one user turn)."""
    config = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    return derive(
        src,
        dest,
        PLAIN_SPECIALS,
        [],
        {"pad": 0, "bos": 1, "eos": 2, "prompt": 3, "response": 4},
        PLAIN_TEMPLATE,
        config,
        [2],
    )


def legacy(src: Path, dest: Path) -> Path:
    """A bundle exported before chat templates: plain format from `special_tokens`, no
    template files, no stop ids."""
    return derive(
        src, dest, PLAIN_SPECIALS, [], {"pad": 0, "bos": 1, "eos": 2, "prompt": 3, "response": 4}
    )


class LiveServer:
    """uvicorn serving `app` on a free loopback port, in a thread of this process (so tests can
    reach into the model's worker while real sockets talk to it)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll until `predicate()` holds (a generous bound against hangs, not a latency check)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def serve_process(folder: Path, *flags: str, env: dict | None = None, timeout: float = 60):
    """`lmpipe serve <folder> <flags>` in its own process on a free loopback port; yields its
    base URL once /health answers, stops it on exit."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmpipe.cli", "serve", str(folder), "--port", str(port), *flags],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, timeout=timeout, what="lmpipe serve to start")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


class Gate:
    """Holds the model's worker at its next batch until opened, so requests pile up behind it."""

    def __init__(self, completer):
        self.completer, self.open_ = completer, threading.Event()
        self.held = threading.Event()  # set once the worker waits at the gate with a batch
        self.inner = completer.lm.stream_rows
        completer.lm.stream_rows = self.stream_rows

    def stream_rows(self, prompts, rows):
        self.held.set()
        self.open_.wait(300)  # only a bound against a hung test; the tests open it themselves
        yield from self.inner(prompts, rows)

    def open(self):
        self.open_.set()
        self.completer.lm.stream_rows = self.inner
