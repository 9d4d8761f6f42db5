"""Chat templates: how a conversation becomes token ids, for every model lmpipe reads or writes.

A template is a Jinja string in Hugging Face's `chat_template` convention (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`), so `apply_chat_template` and lmpipe render the
same text. Models lmpipe trains from scratch carry `PLAIN_TEMPLATE`, their one-turn format
`<|bos|><|prompt|>…<|response|>…<|eos|>` written as Jinja; a pretrained base brings its own.

Encoding renders the template with a placeholder for each message's content, tokenizes the
template's own text with special tokens parsed, and each content with special tokens *not* parsed:
text a user typed never becomes a control token (`"<|im_end|>"` in a prompt stays plain text).
A template that inspects a message's content (e.g. looks for a tag in it) sees the placeholder;
the templates of chat models place content, they do not parse it. Only torch-free imports here:
the ONNX server uses this module as it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from lmpipe.io import read_json_object

PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if not loop.first %}{{ raise_exception('this model was trained on one user turn "
    "followed by one assistant turn') }}{% endif %}"
    "{{ bos_token + '<|prompt|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|response|>' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('this model has no ' + message['role'] + ' turn: send one user "
    "message') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|response|>' }}{% endif %}"
)
"""lmpipe's from-scratch format as a Hugging Face chat template (one user turn, one answer)."""

TEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('this template has only user and assistant turns') }}"
    "{% endif %}"
    "{% endfor %}"
)
"""For a pretrained base without a chat template: the prompt, a blank line, the answer, EOS."""

_SENTINEL = "\x00lmpipe-content-{}\x00"
_SENTINEL_RE = re.compile("\x00lmpipe-content-(\\d+)\x00")


class TemplateError(ValueError):
    """A template that cannot render these messages, or a tokenizer folder without one."""


@dataclass(frozen=True)
class Encoded:
    """A rendered conversation as token ids. `roles[i]` is the role of the message whose content
    token i belongs to, or None for the template's own tokens (markers, role names)."""

    ids: list[int]
    roles: list[str | None]


def _raise(message: str) -> None:
    raise TemplateError(message)


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer with its chat template and the token ids that frame a conversation.

    `stop_ids`: EOS and the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, …);
    generation stops at any of them. `pad_id` fills padded positions only: attention masks and
    lengths say what is padding, so a PAD that equals EOS (SmolLM2, Llama) is fine."""

    tokenizer: Tokenizer
    source: str
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None

    @property
    def kind(self) -> str:
        return "plain" if self.source == PLAIN_TEMPLATE else "chat"

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        eos = self.token_id(self.eos_token)
        if eos is None:
            raise TemplateError(f"the tokenizer has no EOS token {self.eos_token!r}")
        return eos

    @property
    def pad_id(self) -> int:
        pad = self.token_id(self.pad_token)
        return self.eos_id if pad is None else pad

    @cached_property
    def _literal(self) -> Tokenizer:
        """The same tokenizer with special tokens matched as plain text (for user content)."""
        tok = Tokenizer.from_str(self.tokenizer.to_str())
        tok.encode_special_tokens = True
        return tok

    @cached_property
    def _jinja(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # the environment Hugging Face renders chat templates in: blocks trimmed, sandboxed
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.source)
        except Exception as err:  # jinja2.TemplateSyntaxError and friends
            raise TemplateError(f"the chat template does not parse: {err}") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False):
        """The conversation as text, exactly as `tokenizer.apply_chat_template(tokenize=False)`."""
        try:
            return self._jinja.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                pad_token=self.pad_token or "",
            )
        except TemplateError:
            raise
        except Exception as err:
            raise TemplateError(f"the chat template failed on these messages: {err}") from None

    def encode(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
    ) -> Encoded:
        """Token ids of the rendered conversation; message contents are encoded as plain text."""
        for m in messages:
            if not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
                raise TemplateError("every message needs a string 'role' and a string 'content'")
            if any(isinstance(v, str) and "\x00" in v for v in m.values()):
                raise TemplateError("message fields cannot contain NUL characters")
        masked = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
        text = self.render(masked, add_generation_prompt)
        ids: list[int] = []
        roles: list[str | None] = []
        pieces = _SENTINEL_RE.split(text)  # template, index, template, index, …, template
        for j, piece in enumerate(pieces):
            if j % 2:
                m = messages[int(piece)]
                new = self._literal.encode(m["content"], add_special_tokens=False).ids
                role = m["role"]
            elif piece:
                new = self.tokenizer.encode(piece, add_special_tokens=False).ids
                role = None
            else:
                continue
            ids += new
            roles += [role] * len(new)
        return Encoded(ids, roles)

    def prompt_ids(self, prompt: str) -> list[int]:
        """One user turn and the generation prompt: what the model continues from."""
        return self.encode([{"role": "user", "content": prompt}], add_generation_prompt=True).ids

    def fitting_prompts(
        self, prompts: Sequence[str], context: int, max_new_tokens: int, limit: int | None = None
    ) -> tuple[list[str], list[list[int]]]:
        """The first `limit` prompts whose turn leaves room for `max_new_tokens` in `context`,
        as texts and as token ids."""
        pairs = [(t, self.prompt_ids(t)) for t in prompts]
        pairs = [(t, p) for t, p in pairs if len(p) + max_new_tokens <= context][:limit]
        return [t for t, _ in pairs], [p for _, p in pairs]

    def text_ids(self, text: str) -> list[int]:
        """Plain text as tokens, special-token markers included as text."""
        return self._literal.encode(text, add_special_tokens=False).ids

    @cached_property
    def end_of_turn_id(self) -> int:
        """The token the template closes an assistant turn with (EOS where it closes with
        nothing special)."""
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        masked = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
        after = self.render(masked).split(_SENTINEL.format(1), 1)[-1]
        ids = self.tokenizer.encode(after, add_special_tokens=False).ids if after else []
        specials = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        return ids[0] if ids and ids[0] in specials else self.eos_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys([self.eos_id, self.end_of_turn_id]))

    @cached_property
    def response_marker(self) -> tuple[int, bool] | None:
        """(token id, last) that splits a sequence into prompt and response: the response starts
        after the first occurrence of the id (the plain template's `<|response|>`, which user
        text cannot produce) or, for chat templates, after its last occurrence (the last special
        token of the generation prompt, e.g. `<|im_start|>` of the assistant turn, which also
        opens the earlier turns). None where the generation prompt has no special token
        (`TEXT_TEMPLATE`): the reward model then reads whole sequences."""
        if self.kind == "plain":
            return self.tokenizer.token_to_id("<|response|>"), False
        masked = [{"role": "user", "content": _SENTINEL.format(0)}]
        after = _SENTINEL_RE.split(self.render(masked, add_generation_prompt=True))[-1]
        ids = self.tokenizer.encode(after, add_special_tokens=False).ids if after else []
        specials = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        marks = [i for i in ids if i in specials]
        return (marks[-1], True) if marks else None

    def pair(self, prompt: str, response: str) -> tuple[list[int], list[bool]]:
        """(ids, loss mask) of a prompt and its answer: the prompt as generation starts from it,
        then the answer's tokens and the end-of-turn token, which alone carry the loss."""
        head = self.prompt_ids(prompt)
        body = [*self.text_ids(response), self.end_of_turn_id]
        return head + body, [False] * len(head) + [True] * len(body)

    def conversation(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[bool]]:
        """(ids, loss mask) of a whole conversation: loss on every assistant turn's tokens and
        the end-of-turn token that closes it; the rendering is cut after the last one."""
        enc = self.encode(messages)
        eot = self.end_of_turn_id
        mask = [r == "assistant" for r in enc.roles]
        for i in range(1, len(enc.ids)):
            if enc.ids[i] == eot and enc.roles[i] is None and enc.roles[i - 1] == "assistant":
                mask[i] = True
        if not any(mask):
            raise TemplateError("a chat example needs at least one assistant message")
        last = max(i for i, m in enumerate(mask) if m)
        return enc.ids[: last + 1], mask[: last + 1]

    def decode(self, ids: Sequence[int]) -> str:
        """Response text: stops at the first stop token, special tokens left out."""
        stops = set(self.stop_ids)
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode(list(ids[:cut]), skip_special_tokens=True)


def plain_template(tokenizer: Tokenizer) -> ChatTemplate:
    """lmpipe's from-scratch format on a tokenizer that has its special tokens."""
    return ChatTemplate(tokenizer, PLAIN_TEMPLATE, "<|bos|>", "<|eos|>", "<|pad|>")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json holds special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_template_source(directory: str | Path) -> str | None:
    """The folder's chat template: `chat_template.jinja`, else tokenizer_config.json's
    `chat_template` (a string, or named templates of which 'default' is used)."""
    directory = Path(directory)
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    config = _read_config(directory)
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return source if isinstance(source, str) and source else None


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    if not path.exists():
        return {}
    return read_json_object(path, TemplateError, "restore the file")


def load_template(directory: str | Path, required: bool = True) -> ChatTemplate | None:
    """The tokenizer and chat template of a model, data or bundle folder. Without a template:
    TemplateError if `required`, else None."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.exists():
        raise TemplateError(f"{path} does not exist: this folder has no tokenizer")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:
        raise TemplateError(f"{path} is not a readable tokenizer ({err}): restore it") from None
    source = read_template_source(directory)
    config = _read_config(directory)
    if source is None and tok.token_to_id("<|response|>") is not None:
        # a folder lmpipe wrote before templates were saved: its format is the plain one
        source = PLAIN_TEMPLATE
        config = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    if source is None:
        if required:
            raise TemplateError(
                f"{directory} has no chat template (no chat_template.jinja, no chat_template in "
                "tokenizer_config.json)"
            )
        return None
    return ChatTemplate(
        tok,
        source,
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
        pad_token=_token_text(config.get("pad_token")),
    )
