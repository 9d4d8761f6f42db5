"""SFT: pairs and conversations in the chat template as examples with loss on the answers only
(batched by `lmpipe.batches.PairBatches`).

A pair is rendered as the prompt with the generation prompt (`ChatTemplate.prompt_ids`), then
the answer and the end-of-turn token; with lmpipe's plain template that is
`BOS PROMPT <prompt> RESPONSE <response> EOS`. Labels are IGNORE on the prompt, the template's
markers and padding; the answer's tokens and its end-of-turn token carry the loss, so the model
learns what to say and when to stop.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmpipe.batches import Example, example
from lmpipe.chat import ChatTemplate


def prompt_ids(template: ChatTemplate, prompt: str) -> list[int]:
    """Token ids of a prompt in the template, ending with the generation prompt."""
    return template.prompt_ids(prompt)


def encode_pair(template: ChatTemplate, prompt: str, response: str, context: int) -> Example | None:
    """One training example, or None when the prompt alone does not fit the context."""
    return example(*template.pair(prompt, response), context)


def encode_row(template: ChatTemplate, row: dict, context: int) -> Example | None:
    """A `{"prompt", "response"}` pair or a `{"messages": [...]}` conversation (loss on every
    assistant turn)."""
    if "messages" in row:
        return example(*template.conversation(row["messages"]), context)
    return encode_pair(template, row["prompt"], row["response"], context)


def encode_pairs(template: ChatTemplate, pairs: Sequence[dict], context: int) -> list[Example]:
    out = [e for p in pairs if (e := encode_row(template, p, context))]
    if not out:
        raise ValueError(f"no SFT pair fits model.context = {context}; raise it or shorten pairs")
    return out
