"""Streamed text: a row's tokens turned into text as they arrive, cut at the request's stop
strings."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """One row's text as its tokens arrive, for streaming.

    Incremental decoding: each token is decoded with the token before it as context (decoders
    that drop a leading space or split a character across tokens need it), and text is taken
    only once it ends in a whole character. Stop strings: text that contains one is cut before
    it, and text that could still become the start of one is held back, so nothing released
    ever has to be taken back. The released pieces add up to `decode(all tokens)` cut before
    the stop string that text completes first (a test checks it against that reference)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self._prefix = self._read = 0  # tokens[_prefix:_read] decode to text already taken
        self.pending = ""  # decoded, not yet released (could begin a stop string)
        self.text = ""  # released
        self.stopped = False  # a stop string ended the text

    def _take(self, final: bool) -> None:
        before = self.decode(self.tokens[self._prefix : self._read])
        after = self.decode(self.tokens[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.pending += after[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)

    def push(self, token: int) -> str:
        """Add a token; the text now safe to send (often '')."""
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        self._take(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The row ended (a stop token, its budget): the rest of the text."""
        if self.stopped:
            return ""
        self._take(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.pending
        found = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if found:  # the stop string completed first (then the longest), as generation meets it
            out, self.stopped = text[: min(found)[1]], True
        else:
            out = text if final else text[: len(text) - self._held(text)]
        self.pending = "" if self.stopped else text[len(out) :]
        self.text += out
        return out

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of a stop string."""
        held = 0
        for s in self.stops:
            i = text.find(s[0], max(0, len(text) - len(s) + 1))
            while i >= 0:
                if s.startswith(text[i:]):
                    held = max(held, len(text) - i)
                    break
                i = text.find(s[0], i + 1)
        return held
