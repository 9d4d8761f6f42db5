"""Clients that leave at every point of a request give back their queue slot: a real uvicorn on a
loopback port, raw sockets closed (FIN) or reset (RST) during the upload, while queued before
the first byte, during prefill, mid-stream, and forty at once; then the full capacity is back
and serves. (Aborted streams used to keep their slot for good: 429 for everyone after.)"""

from __future__ import annotations

import json
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lmpipe.serve.app import create_app
from lmpipe.serve.engine import Completer
from lmpipe.serve.limits import ServerLimits
from serve_bundles import LiveServer, wait_until

CAPACITY = 4


@pytest.fixture(scope="module")
def server(bundle):
    _, path = bundle
    completer = Completer(path, limits=ServerLimits(max_tokens=16, queue_limit=CAPACITY))
    with LiveServer(create_app(completer)) as live:
        live.completer = completer
        yield live


class Hold:
    """Blocks the model's worker inside its `at`-th `forward` call from now (1: the next
    batch's prefill, 3: its second decode step) until released."""

    def __init__(self, lm, at: int) -> None:
        self.lm, self.inner, self.at, self.calls = lm, lm.forward, at, 0
        self.entered, self.go = threading.Event(), threading.Event()
        lm.forward = self

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.at:
            self.entered.set()
            self.go.wait(30)
        return self.inner(*args)

    def release(self) -> None:
        self.lm.forward = self.inner
        self.go.set()


def open_request(port: int, body: dict, path="/v1/completions", send=None) -> socket.socket:
    """A raw HTTP/1.1 request; `send` bytes of the body only, if given."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head + data[: len(data) if send is None else send])
    return s


def leave(s: socket.socket, reset: bool) -> None:
    if reset:  # RST instead of FIN, as a killed client
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def read_until(s: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before {marker!r}: {got!r}"
        got += chunk
    return got


STREAM = {"prompt": "w7 w8", "max_tokens": 16, "temperature": 0, "stream": True}
CHAT_LIKE = {"prompt": "w9", "max_tokens": 16}


def capacity_is_back(server) -> None:
    c = server.completer
    wait_until(lambda: c.pending == 0 and not c.waiting, what="every slot back")
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["free"] == health["capacity"] == CAPACITY
    body = {"prompt": "w11", "max_tokens": 4}
    with ThreadPoolExecutor(CAPACITY) as pool:  # the full capacity serves again
        got = list(
            pool.map(
                lambda _: httpx.post(f"{server.url}/v1/completions", json=body, timeout=30),
                range(CAPACITY),
            )
        )
    assert [r.status_code for r in got] == [200] * CAPACITY


@pytest.mark.parametrize("reset", [False, True])
def test_leaving_during_the_upload(server, reset):
    s = open_request(server.port, STREAM, send=10)
    leave(s, reset)
    capacity_is_back(server)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("reset", [False, True])
def test_leaving_during_prefill(server, stream, reset):
    hold = Hold(server.completer.lm, at=1)
    try:
        s = open_request(server.port, {**STREAM, "stream": stream})
        assert hold.entered.wait(30)
        assert server.completer.pending == 1
        leave(s, reset)
        wait_until(lambda: server.completer.pending == 0, what="the slot back during prefill")
    finally:
        hold.release()
    capacity_is_back(server)


@pytest.mark.parametrize("reset", [False, True])
def test_leaving_while_queued_before_the_first_byte(server, reset):
    hold = Hold(server.completer.lm, at=1)
    try:
        blocker = open_request(server.port, CHAT_LIKE)
        assert hold.entered.wait(30)  # the model is busy with the blocker's prefill
        queued = [
            open_request(server.port, {**STREAM, "stream": i % 2 == 0}) for i in range(CAPACITY - 1)
        ]
        wait_until(lambda: server.completer.pending == CAPACITY, what="all admitted")
        for s in queued:
            s.settimeout(0.05)
            with pytest.raises(TimeoutError):
                s.recv(1)  # nothing sent yet
            leave(s, reset)
        wait_until(lambda: server.completer.pending == 1, what="the queued slots back")
    finally:
        hold.release()
    assert b" 200 OK" in read_until(blocker, b"}")  # the blocker is served as usual
    blocker.close()
    capacity_is_back(server)


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", STREAM),
        ("/v1/completions", {**STREAM, "stop": ["zzz"], "n": 2}),
    ],
)
def test_leaving_mid_stream(server, path, body):
    hold = Hold(server.completer.lm, at=3)
    try:
        s = open_request(server.port, body, path)
        assert hold.entered.wait(30)
        assert b"data: {" in read_until(s, b"\n\n")  # a chunk arrived
        leave(s, reset=True)
        wait_until(lambda: server.completer.pending == 0, what="the slot back mid-stream")
    finally:
        hold.release()
    capacity_is_back(server)


def test_forty_streams_reset_at_once(server):
    """The issue's storm: 40 streaming requests whose clients reset at once."""
    hold = Hold(server.completer.lm, at=1)
    try:
        sockets = [open_request(server.port, STREAM) for _ in range(40)]
        wait_until(lambda: server.completer.pending == CAPACITY, what="a full server")
        for s in sockets:
            leave(s, reset=True)
        wait_until(lambda: server.completer.pending == 0, what="every slot back")
    finally:
        hold.release()
    capacity_is_back(server)
