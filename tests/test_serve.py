"""The HTTP server over an ONNX bundle: good and bad requests, streaming, concurrency, 429."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from lmpipe.serve.app import create_app
from lmpipe.serve.engine import Completer
from lmpipe.serve.limits import ServerLimits
from serve_bundles import Gate


@pytest.fixture(scope="module")
def client(bundle):
    _, path = bundle
    completer = Completer(path, limits=ServerLimits(max_tokens=16, max_n=4, queue_limit=32))
    with TestClient(create_app(completer)) as c:
        c.completer = completer
        yield c


def test_health_and_models(client):
    assert client.get("/health").json()["status"] == "ok"
    data = client.get("/v1/models").json()["data"]
    assert data[0]["id"] == "b" and data[0]["object"] == "model"


def test_completion_in_openai_shape(client):
    r = client.post(
        "/v1/completions",
        json={"prompt": "w7 w8", "max_tokens": 5, "n": 2, "seed": 1, "temperature": 0.8},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "b"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert body["usage"]["completion_tokens"] <= 10
    again = client.post(
        "/v1/completions",
        json={"prompt": "w7 w8", "max_tokens": 5, "n": 2, "seed": 1, "temperature": 0.8},
    )
    assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in body["choices"]]


def test_greedy_completion_matches_the_runtime(client, bundle):
    lm = client.completer.lm
    want = lm.generate_ids([lm.prompt_ids("w9 w10")], max_new_tokens=8, temperature=0)
    r = client.post("/v1/completions", json={"prompt": "w9 w10", "max_tokens": 8, "temperature": 0})
    assert r.json()["choices"][0]["text"] == lm.decode(want.tokens[0])


def test_stop_strings_cut_the_text(client):
    full = client.post(
        "/v1/completions", json={"prompt": "w3", "max_tokens": 12, "temperature": 0}
    ).json()
    text = full["choices"][0]["text"]
    if len(text) < 4:
        pytest.skip("greedy continuation too short to cut")
    stop = text[2:4]
    cut = client.post(
        "/v1/completions", json={"prompt": "w3", "max_tokens": 12, "temperature": 0, "stop": [stop]}
    ).json()
    assert cut["choices"][0]["text"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_streaming_sends_the_same_text_as_server_sent_events(client):
    req = {"prompt": "w11 w12", "max_tokens": 10, "temperature": 0}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "body,status,words",
    [
        ({"max_tokens": 4}, 400, "prompt"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": "w7", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "w7", "max_tokens": 17}, 400, "limit of 16"),
        ({"prompt": "w7", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "w7", "n": 5}, 400, "limit of 4"),
        ({"prompt": "w7", "temperature": -1}, 400, "temperature"),
        ({"prompt": "w7", "top_p": 1.5}, 400, "top_p"),
        ({"prompt": " ".join(["w7"] * 60), "max_tokens": 8}, 400, "context"),
        ({"prompt": [], "max_tokens": 2}, 400, "empty"),
        ({"prompt": "w7", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "w7", "model": "../../etc/passwd"}, 404, "not served"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(client, body, status, words):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_malformed_json_is_a_400(client):
    r = client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_sixteen_concurrent_requests_are_all_served_correctly(client):
    lm = client.completer.lm
    prompts = [f"w{20 + i} w{40 + i}" for i in range(16)]
    want = [
        lm.decode(lm.generate_ids([lm.prompt_ids(p)], max_new_tokens=6, temperature=0).tokens[0])
        for p in prompts
    ]

    def ask(p):
        return client.post("/v1/completions", json={"prompt": p, "max_tokens": 6, "temperature": 0})

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, prompts))
    assert all(r.status_code == 200 for r in got)
    assert [r.json()["choices"][0]["text"] for r in got] == want


def post_in_threads(c, bodies, results):
    threads = [
        threading.Thread(
            target=lambda i=i, b=b: results.__setitem__(i, c.post("/v1/completions", json=b))
        )
        for i, b in enumerate(bodies)
    ]
    for t in threads:
        t.start()
    return threads


def test_requests_beyond_the_queue_limit_get_429(bundle):
    _, path = bundle
    completer = Completer(path, limits=ServerLimits(queue_limit=2))
    with TestClient(create_app(completer)) as c:
        gate = Gate(completer)  # the model is busy: requests queue behind it
        results = {}
        try:
            threads = post_in_threads(c, [{"prompt": "w7", "max_tokens": 2}] * 2, results)
            while completer.pending < 2:
                threading.Event().wait(0.01)
            r = c.post("/v1/completions", json={"prompt": "w7", "max_tokens": 2})
            assert r.status_code == 429 and "busy" in r.json()["error"]["message"]
        finally:
            gate.open()
        for t in threads:
            t.join()
        assert [results[i].status_code for i in range(2)] == [200, 200]


def test_waiting_requests_run_as_one_batch_each_with_its_own_settings(bundle):
    """Requests that queue while the model is busy share the next batch; each keeps its own
    max_tokens, temperature, seed and stop strings, and gets what it would get alone."""
    _, path = bundle
    completer = Completer(path, limits=ServerLimits(max_tokens=16, max_n=4))
    bodies = [
        {"prompt": "w3 w4", "max_tokens": 3, "temperature": 0},
        {"prompt": "w5", "max_tokens": 12, "temperature": 0},
        {"prompt": "w6 w7 w8 w9", "max_tokens": 9, "temperature": 0.9, "seed": 5, "n": 3},
        {"prompt": "w10", "max_tokens": 7, "temperature": 1.0, "top_k": 5, "seed": 2},
    ]
    with TestClient(create_app(completer)) as c:
        alone = [c.post("/v1/completions", json=b).json() for b in bodies]
        first = completer.batches
        gate = Gate(completer)
        threads = post_in_threads(c, [{"prompt": "w1", "max_tokens": 2}], {})
        assert gate.held.wait(60)  # the worker holds the first request's batch at the gate
        together = {}
        threads += post_in_threads(c, bodies, together)  # they queue behind the gated batch
        # queued, not just admitted: a request holds its slot before it is tokenized and queued
        while len(completer.waiting) < len(bodies):
            threading.Event().wait(0.01)
        gate.open()
        for t in threads:
            t.join()
    # the gated request ran alone; the 4 waiting ones (6 rows) went through as one batch
    assert completer.batches - first == 2
    for i, body in enumerate(bodies):
        got = together[i].json()
        assert [ch["text"] for ch in got["choices"]] == [ch["text"] for ch in alone[i]["choices"]]
        assert [ch["finish_reason"] for ch in got["choices"]] == [
            ch["finish_reason"] for ch in alone[i]["choices"]
        ]
        assert got["usage"]["completion_tokens"] <= body["max_tokens"] * body.get("n", 1)


def test_cli_generate_prints_completions(bundle):
    _, path = bundle
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmpipe.cli",
            "generate",
            str(path),
            "-p",
            "w7 w8",
            "-p",
            "w9",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.stdout.splitlines()) == 2
    bad = subprocess.run(
        [sys.executable, "-m", "lmpipe.cli", "generate", str(path.parent), "-p", "x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "bundle.json" in bad.stderr
