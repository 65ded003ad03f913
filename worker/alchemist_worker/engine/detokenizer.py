"""Turns a growing list of token ids into text, one token at a time, and finds stop strings in it.

Decoding token by token is wrong for byte-level tokenizers (a character may span tokens) and for tokenizers
that merge spaces with their neighbours, and decoding the whole output at every step costs O(n^2). We decode a
short window: the text of tokens[prefix:] minus the text of tokens[prefix:read]; when the window ends inside
a multi-byte character (U+FFFD) we wait for the next token.

Stop strings are not part of the returned text (as in OpenAI's API). While streaming, the last
`len(longest stop string) - 1` characters are held back, since they may be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

# Tokens of the prompt decoded together with the first output token, so that the first word gets its space.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, decode: Decode, prompt_token_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._tokens: list[int] = list(prompt_token_ids)
        self._read = len(self._tokens)
        self._prefix = max(0, self._read - PROMPT_CONTEXT_TOKENS)
        self._stop = tuple(stop)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self.stopped_by: str | None = None
        self._sent = 0

    def push(self, token_id: int) -> str:
        """Adds one generated token; returns the text it completed (possibly empty). Truncates at a stop string."""
        if self.stopped_by is not None:
            return ""
        self._tokens.append(token_id)
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self._tokens)
        start = max(0, len(self.text) - self._holdback)
        self.text += delta
        self._find_stop(start)
        return delta

    def flush(self) -> None:
        """At the end of generation: emits text still waiting for a character to complete (as U+FFFD)."""
        if self.stopped_by is not None or self._read == len(self._tokens):
            return
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        self._prefix, self._read = self._read, len(self._tokens)
        if len(after) > len(before):
            start = max(0, len(self.text) - self._holdback)
            self.text += after[len(before) :]
            self._find_stop(start)

    def _find_stop(self, start: int) -> None:
        """Looks for stop strings that end inside the newly added text; truncates at the earliest one."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            at = self.text.find(stop, start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is not None:
            self.text = self.text[: best[0]]
            self.stopped_by = best[1]

    def take_stream_delta(self, finished: bool) -> str:
        """Text not yet handed out that can no longer turn into a stop string (all of it once finished)."""
        end = (
            len(self.text)
            if finished or self.stopped_by
            else max(self._sent, len(self.text) - self._holdback)
        )
        delta = self.text[self._sent : end]
        self._sent = end
        return delta
