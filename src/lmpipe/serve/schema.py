"""A request body, read by this server rather than FastAPI: the JSON parsed with bounds
(`parse_body`), then checked against OpenAI's completions and chat completions parameters
(`read_request`), every problem a `RequestError` that names the parameter."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmpipe.serve.errors import RequestError

MAX_JSON_DEPTH = 32  # the request schema nests 5 deep (messages → part → text)
MAX_STOP_CHARS = 256  # per stop string: held-back text is checked against each on every token


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object, or a RequestError that says what is wrong with it: not UTF-8,
    not JSON (NaN and Infinity included), not an object, nested too deeply, or holding a string
    that is not Unicode text (a lone surrogate such as "\\ud800")."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"the body is not valid UTF-8 (byte {err.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, NaN, an integer of more than 4300 digits
        raise RequestError(f"the body is not valid JSON: {err}") from None
    # the depth is checked before the type: whether json.loads itself hits RecursionError on a
    # deep array depends on the caller's stack, so a deep array must fail here the same way
    todo: list[tuple[Any, int, str]] = [(obj, 1, "body")] if isinstance(obj, dict | list) else []
    while todo:  # iterative: the walk itself must not recurse on hostile input
        value, depth, where = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, v in items:
            path = f"{where}.{key}" if isinstance(key, int) or _is_text(key) else where
            if isinstance(key, str) and not _is_text(key):
                raise RequestError(f"a key in {where} is not valid Unicode (a lone surrogate)")
            if isinstance(v, str) and not _is_text(v):
                raise RequestError(
                    f"{path.removeprefix('body.')} is not valid Unicode text (it holds a lone "
                    "surrogate such as \\ud800)",
                    param=str(key) if isinstance(key, str) else None,
                )
            if isinstance(v, dict | list):
                todo.append((v, depth + 1, path))
    if not isinstance(obj, dict):
        raise RequestError("the body must be a JSON object")
    return obj


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ----------------------------------------------------------------------------- requests

# OpenAI parameters this server does not implement, with the values that ask for nothing (sent
# by many clients by default); any other value is a 400 that names the parameter.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "store": (None, False),
}
# Identifiers for the caller's own bookkeeping: they change nothing in the output; accepted.
IGNORED = frozenset({"user", "metadata", "safety_identifier", "prompt_cache_key", "service_tier"})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CommonRequest(BaseModel):
    """The sampling fields both endpoints honour. `top_k` is lmpipe's (0 = off)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(1.0, ge=0, le=1)  # 0: the most likely token only (greedy)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(
                f"stop takes up to 4 non-empty strings of up to {MAX_STOP_CHARS} characters"
            )
        return stops


class CompletionRequest(CommonRequest):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt list is empty")
        return v

    def texts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class ChatMessage(BaseModel):
    """A message; `content` a string or text parts (joined with newlines). `developer` is
    OpenAI's newer name for `system`. Fields an assistant message may carry when a client sends
    the previous answer back are accepted empty only."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    function_call: None = None
    refusal: None = None
    audio: None = None
    annotations: list[Any] | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[dict[str, Any]] | None) -> str:
        if v is None:
            raise ValueError("a message needs content (a string or a list of text parts)")
        if isinstance(v, str):
            return v
        texts = []
        for part in v:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"content part of type {part.get('type')!r} is not supported: "
                    'send {"type": "text", "text": "..."} parts'
                )
            if extra := sorted(set(part) - {"type", "text"}):
                raise ValueError(f"unknown fields in a text part: {', '.join(extra)}")
            texts.append(part["text"])
        return "\n".join(texts)

    @field_validator("tool_calls", "annotations")
    @classmethod
    def _empty(cls, v: list[Any] | None) -> None:
        if v:
            raise ValueError("tool calls and annotations are not supported by this server")
        return None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and "\x00" in v:
            raise ValueError("name must not contain NUL characters")
        return v

    def for_template(self) -> dict[str, str]:
        m = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        return m if self.name is None else {**m, "name": self.name}


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    """`value` is one of the values that ask for nothing (0.0 counts as 0; True is not 1)."""
    return any(
        value is v or (value == v and isinstance(value, bool) == isinstance(v, bool))
        for v in neutral
    )


def read_request(raw: dict[str, Any], schema: type[CommonRequest]) -> Any:
    """Validate a parsed body: unknown parameters and unsupported ones (with a value that asks
    for something) are named in the 400, then the fields are checked."""
    fields = set(schema.model_fields)
    unknown = sorted(
        k for k in raw if k not in fields and k not in UNSUPPORTED and k not in IGNORED
    )
    if unknown:
        raise RequestError(f"unknown parameter(s): {', '.join(unknown)}", param=unknown[0])
    asked = [k for k in raw if k in UNSUPPORTED and not _neutral(raw[k], UNSUPPORTED[k])]
    if asked:
        raise RequestError(
            f"this server does not support: {', '.join(asked)} (leave them out)", param=asked[0]
        )
    try:
        return schema.model_validate({k: v for k, v in raw.items() if k in fields})
    except ValidationError as err:
        parts, param = [], None
        for e in err.errors(include_input=False, include_url=False):
            loc = ".".join(str(x) for x in e["loc"])
            param = param or (str(e["loc"][0]) if e["loc"] else None)
            parts.append(f"{loc or 'body'}: {e['msg']}")
        raise RequestError("; ".join(parts), param=param) from None
