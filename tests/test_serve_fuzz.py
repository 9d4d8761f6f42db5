"""Fuzzing the request schema: whatever a client sends, the answer is never a 5xx, and every 4xx
comes in OpenAI's error shape. Requests are drawn from the schema's own fields with values of
every JSON type (hostile strings included: surrogates, markers, NUL), with unknown and
unsupported fields mixed in, and as raw bytes. The test client re-raises any exception the app
lets escape, so an internal error fails here with its traceback."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import serve_bundles
from lmpipe.serve.app import create_app
from lmpipe.serve.engine import Completer
from lmpipe.serve.limits import ServerLimits

LIMITS = ServerLimits(
    max_tokens=4,
    max_n=2,
    max_prompts=3,
    max_body_bytes=8192,
    max_prompt_chars=200,
    max_request_tokens=120,
)
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def client(bundle, tmp_path_factory):
    folder = serve_bundles.chatml(bundle[1], tmp_path_factory.mktemp("fuzz") / "chatml")
    with TestClient(create_app(Completer(folder, limits=LIMITS))) as c:
        yield c


PIECES = ["w9", "w10", "w77", "<|im_end|>", "<|im_start|>", "\x00", "y.", "🙂", "\u2028", " ", "\n"]
WORDS = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)
TEXT = st.one_of(WORDS, st.text(st.characters(exclude_categories=("Cs",)), max_size=12))
HOSTILE = st.one_of(TEXT, st.text(max_size=6), st.sampled_from(["\ud800", "w7 " * 120]))
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 20),
    st.integers(),
    st.floats(allow_nan=True),
    st.sampled_from([0, 1, 2, 1e-300, 5e-324, 2**63, -0.0, 1.5]),
    HOSTILE,
)
ANY = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(HOSTILE, inner, max_size=3),
    max_leaves=8,
)
PART = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer"]),
        "content": st.one_of(TEXT, st.lists(PART, min_size=1, max_size=2)),
    }
)
SAMPLING = {
    "model": st.sampled_from(["chatml", None]),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "top_k": st.integers(0, 50),
    "n": st.integers(1, 2),
    "stop": st.one_of(st.none(), TEXT.filter(bool), st.lists(TEXT.filter(bool), max_size=4)),
    "seed": st.integers(0, 2**63 - 1),
    "stream": st.booleans(),
}
# a valid request, then up to two fields (its own, OpenAI's or unknown) set to anything
EXTRA = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "presence_penalty",
    "logit_bias",
    "tools",
    "user",
    "suffix",
    "unknown_field",
]
MUTATIONS = st.lists(st.tuples(st.sampled_from(EXTRA), ANY), max_size=2)


def requests(main: dict) -> st.SearchStrategy:
    valid = st.fixed_dictionaries(main, optional=SAMPLING)
    return st.builds(
        lambda body, changes: {**body, **dict(changes)}, valid, st.one_of(st.just([]), MUTATIONS)
    )


COMPLETION = requests(
    {
        "prompt": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3)),
        "max_tokens": st.integers(1, 4),
    }
)
CHAT = requests(
    {"messages": st.lists(MESSAGE, min_size=1, max_size=3), "max_tokens": st.integers(1, 4)}
)


def check(r) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err
    elif "text/event-stream" in r.headers.get("content-type", ""):
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"]


def post(client, path: str, body: dict):
    data = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    return client.post(path, content=data, headers={"content-type": "application/json"})


@FUZZ
@given(body=COMPLETION)
def test_completions_never_answer_5xx(client, body):
    check(post(client, "/v1/completions", body))


@FUZZ
@given(body=CHAT)
def test_chat_completions_never_answer_5xx(client, body):
    check(post(client, "/v1/chat/completions", body))


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=64),
        st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ),
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models/x"]),
)
def test_raw_bytes_never_answer_5xx(client, data, path):
    check(client.post(path, content=data, headers={"content-type": "application/json"}))
