"""Limits before work, malformed input, stop strings and sampling edge cases at the API: each
case a hostile or careless client found (a 500, a stall, leaked text), now a 4xx or right."""

from __future__ import annotations

import json
import sys
import threading

import pytest
from fastapi.testclient import TestClient

from lmpipe.serve.app import create_app
from lmpipe.serve.engine import Completer
from lmpipe.serve.errors import RequestError
from lmpipe.serve.limits import ServerLimits
from lmpipe.serve.schema import parse_body
from serve_bundles import Gate

LIMITS = ServerLimits(
    max_tokens=16,
    max_n=4,
    queue_limit=3,
    max_body_bytes=4096,
    max_prompt_chars=500,
    max_request_tokens=200,
)


@pytest.fixture(scope="module")
def client(bundle):
    _, path = bundle
    completer = Completer(path, limits=LIMITS)
    with TestClient(create_app(completer)) as c:
        c.completer = completer
        yield c


class Counter:
    """Counts calls of the tokenizer's entry point."""

    def __init__(self, lm):
        self.lm, self.inner, self.calls = lm, lm.prompt_ids, []
        lm.prompt_ids = self

    def __call__(self, prompt):
        self.calls.append(prompt)
        return self.inner(prompt)

    def close(self):
        self.lm.prompt_ids = self.inner


@pytest.fixture
def tokenized(client):
    counter = Counter(client.completer.lm)
    yield counter.calls
    counter.close()


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def raw(client, body: bytes, path="/v1/completions"):
    return client.post(path, content=body, headers={"content-type": "application/json"})


# ----------------------------------------------------------------------------- limits


def test_a_body_over_the_limit_is_a_413_before_anything_is_parsed(client, tokenized):
    big = json.dumps({"prompt": "w7 " * 3000}).encode()
    error_of(raw(client, big), 413)
    chunked = client.post(
        "/v1/completions",
        content=iter([big[:3000], big[3000:]]),
        headers={"content-type": "application/json"},
    )
    assert "--max-body-bytes" in error_of(chunked, 413)["message"]
    assert tokenized == []


def test_a_long_prompt_is_refused_by_its_characters_before_tokenizing(client, tokenized):
    for body in ({"prompt": "w7 " * 200}, {"prompt": ["w7 " * 100, "w8 " * 100]}):
        assert (
            "--max-prompt-chars"
            in error_of(client.post("/v1/completions", json=body), 400)["message"]
        )
    assert tokenized == []  # the 1 MB prompts that stalled the server never reach the tokenizer


def test_tokens_per_request_count_n_prompts_and_max_tokens(client):
    body = {"prompt": ["w7 w8", "w9", "w10 w11"], "n": 4, "max_tokens": 16}  # 4 × 62 > 200
    err = error_of(client.post("/v1/completions", json=body), 400)
    assert "--max-request-tokens" in err["message"]
    assert client.post("/v1/completions", json={**body, "n": 2}).status_code == 200


def test_each_distinct_prompt_is_tokenized_once(client, tokenized):
    r = client.post(
        "/v1/completions", json={"prompt": ["w7 w8", "w9", "w7 w8"], "n": 4, "max_tokens": 2}
    )
    assert r.status_code == 200 and len(r.json()["choices"]) == 12
    assert sorted(tokenized) == ["w7 w8", "w9"]  # was once per prompt × n


def fill(client, n):
    """n requests that hold a slot each (the worker is gated), in threads."""
    threads = [
        threading.Thread(
            target=client.post,
            args=("/v1/completions",),
            kwargs={"json": {"prompt": "w7", "max_tokens": 2}},
        )
        for _ in range(n)
    ]
    for t in threads:
        t.start()
    return threads


def test_when_full_the_server_refuses_before_tokenizing_and_health_says_so(client, tokenized):
    completer = client.completer
    gate = Gate(completer)
    threads = fill(client, LIMITS.queue_limit)
    try:
        while len(tokenized) < LIMITS.queue_limit:  # all admitted and tokenized
            threading.Event().wait(0.01)
        tokenized.clear()
        r = client.post("/v1/completions", json={"prompt": "w9 w10", "max_tokens": 2})
        assert "busy" in error_of(r, 429)["message"]
        assert tokenized == []  # no work for a request that is refused
        health = client.get("/health")
        assert health.status_code == 503  # readiness fails while nothing can be admitted
        assert health.json()["free"] == 0 and health.json()["capacity"] == LIMITS.queue_limit
    finally:
        gate.open()
    for t in threads:
        t.join()
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["free"] == LIMITS.queue_limit


# ----------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "body,words",
    [
        (b'{"prompt": "w7 \xff\xfe"}', "UTF-8"),
        (b'{"prompt": "\\ud800"}', "surrogate"),
        (b'{"prompt": ["w7", "\\udfff w8"]}', "surrogate"),
        (b'{"prompt": "w7", "stop": ["\\ud83d"]}', "surrogate"),
        (b'{"prompt": "w7", "\\ud800": 1}', "surrogate"),
        (b'{"prompt": "w7", "temperature": NaN}', "NaN"),
        (b'{"prompt": "w7", "max_tokens": 1e999}', "max_tokens"),
        (b'{"prompt": "w7", "seed": 1' + b"0" * 4000 + b"}", "seed"),
        (b"[" * 1000 + b"]" * 1000, "nests deeper"),
        (b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper"),
        (b"[]", "JSON object"),
        (b"", "JSON"),
        (b"\xef\xbb\xbf{}", "JSON"),
        (b'{"prompt": "w7",}', "JSON"),
    ],
)
def test_malformed_bodies_get_a_400_in_openai_shape(client, body, words):
    assert words in error_of(raw(client, body), 400)["message"]
    error_of(raw(client, body, "/v1/chat/completions"), 400)


@pytest.mark.parametrize("limit", [1100, 10_000])
@pytest.mark.parametrize("template", [b"%s", b'{"a": %s}'], ids=["array", "in-object"])
def test_deep_nesting_is_named_whether_or_not_json_recurses_past_the_limit(limit, template):
    """Whether json.loads raises RecursionError on 1000 nested arrays depends on the stack it
    starts from (CI once parsed it and answered "must be a JSON object"): both ways name depth."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        for depth in (33, 1000, 5000):
            with pytest.raises(RequestError, match="nests deeper than 32"):
                parse_body(template % (b"[" * depth + b"]" * depth))
    finally:
        sys.setrecursionlimit(old)
    assert "a" in parse_body(b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}")  # 32 levels: the limit


def test_a_lone_surrogate_in_a_message_is_a_400(client):
    body = b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}'
    error_of(raw(client, body, "/v1/chat/completions"), 400)


def test_unknown_routes_and_methods_answer_in_openai_shape(client):
    error_of(client.post("/v1/engines/x/completions", json={}), 404)
    error_of(client.get("/v1/completions"), 405)


# ----------------------------------------------------------------------------- text and sampling


def complete(client, **body):
    r = client.post("/v1/completions", json={"max_tokens": 16, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def streamed(client, **body):
    with client.stream(
        "POST", "/v1/completions", json={"max_tokens": 16, "temperature": 0, "stream": True, **body}
    ) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]


@pytest.mark.parametrize("prompt", ["w3", "w11 w12", "w40 w41 w42"])
def test_stop_strings_across_token_boundaries_match_the_reference(client, prompt):
    """Stops that start inside one token and end in the next ("y." after "…wa|y.") used to leak
    their first part: the streamed and the whole text must equal the full text cut at the
    stop."""
    full = complete(client, prompt=prompt)["text"]
    words = full.split(" ")
    assert len(words) >= 3
    stops = {w[-1:] + " " + words[i + 1][:2] for i, w in enumerate(words[:-1])}  # across tokens
    stops |= {full[k : k + 3] for k in range(0, len(full) - 3, 4)}
    for stop in sorted(stops):
        want = full[: full.find(stop)]
        got = complete(client, prompt=prompt, stop=[stop, "never here"])
        assert (got["text"], got["finish_reason"]) == (want, "stop"), stop
        text, last = streamed(client, prompt=prompt, stop=stop)
        assert (text, last["finish_reason"]) == (want, "stop"), stop


def test_tiny_temperature_and_top_p_zero_are_greedy(client):
    """A temperature of 1e-300 used to answer 200 with empty text (NaN probabilities)."""
    greedy = complete(client, prompt="w20 w21")
    assert greedy["text"]
    for body in ({"temperature": 1e-300}, {"temperature": 1.0, "top_p": 0.0}):
        assert complete(client, prompt="w20 w21", seed=1, **body) == greedy
