"""Incremental detokenization: the text each streamed token adds, never half a character.

A byte-level tokenizer may split one character's UTF-8 bytes over several tokens (a kana, an
emoji). Decoded alone, or at the end of a sequence, such a token gives U+FFFD. :class:`TextStream`
decodes the whole sequence at every token and hands out only the text that is complete: a token
ending inside a character adds nothing, and the token that completes it adds the whole character.
So the texts of a stream join into the answer's text, as a reader of the stream expects.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what a decoder makes of a character's bytes cut short


class TextStream:
    """The text of a token sequence, handed out token by token; ``decode`` turns ids into text."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._sent = ""

    def push(self, token: int) -> str:
        """Add ``token``; the text it completes ("" while it ends inside a character)."""
        self._ids.append(token)
        text = self._decode(self._ids)
        if text.endswith(REPLACEMENT):
            return ""  # wait: a later token completes the character
        new, self._sent = text[len(self._sent):], text
        return new
