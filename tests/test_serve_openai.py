"""The real `openai` client against a live `lmpipe serve` (its own process, loopback, a free
port, an API key from the environment): chat plain and streamed, completions, model lookup, and
errors as the client's exception types."""

from __future__ import annotations

import openai
import pytest

import serve_bundles
from lmpipe.onnx.runtime import OnnxLM

KEY = "test-key-1"
HELLO = [{"role": "user", "content": "w9 w10 w11"}]


@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory):
    folder = serve_bundles.chatml(bundle[1], tmp_path_factory.mktemp("openai") / "chatml")
    with serve_bundles.serve_process(
        folder, "--max-tokens", "16", env={"LMPIPE_API_KEY": KEY}
    ) as url:
        yield url, OnnxLM(folder)


@pytest.fixture(scope="module")
def client(served):
    url, _ = served
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def expected(lm, ids, max_tokens=8):
    out = lm.generate_ids([ids], max_new_tokens=max_tokens, temperature=0)
    return lm.decode(out.tokens[0])


def test_chat_completions_create(client, served):
    _, lm = served
    r = client.chat.completions.create(model="chatml", messages=HELLO, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected(lm, lm.chat_ids(HELLO))
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(lm.chat_ids(HELLO))


def test_chat_completions_stream(client, served):
    _, lm = served
    stream = client.chat.completions.create(
        model="chatml",
        messages=HELLO,
        max_completion_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(lm, lm.chat_ids(HELLO))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions_create(client, served):
    _, lm = served
    r = client.completions.create(model="chatml", prompt="w20 w21", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == expected(lm, lm.prompt_ids("w20 w21"))


def test_models_and_errors_reach_the_client_typed(client, served):
    url, _ = served
    assert client.models.retrieve("chatml").id == "chatml"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="chatml", messages=HELLO, logprobs=True)
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="chatml", messages=HELLO)
