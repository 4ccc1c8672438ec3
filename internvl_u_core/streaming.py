"""Text of a growing token sequence, decoded a few tokens at a time.

Decoding every new token's whole answer again costs time quadratic in the answer's length; this
decodes only a short window per step (the tokens since the last complete piece of text), so a
streamed answer costs time linear in its length, and each step yields just the new text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDecoder:
    """Feed token ids as they come (:meth:`push`); read the new text back, never a partial UTF-8 character.

    ``decode`` turns a list of ids into text (the tokenizer's ``decode``). Byte-level tokenizers may
    split one character over several tokens: text that ends in U+FFFD (an incomplete character) is
    held back until the tokens that complete it arrive, so the text only ever grows.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the window: the tokens before it are final text
        self._read = 0  # the window's tokens up to here are already in ``text``
        self.text = ""

    @property
    def token_count(self) -> int:
        return len(self._ids)

    def push(self, ids: Sequence[int]) -> str:
        """Add ``ids`` (the next tokens) and return the text they complete ("" while a character is split)."""
        self._ids.extend(int(i) for i in ids)
        window = self._ids[self._prefix :]
        known = self._decode(self._ids[self._prefix : self._read])
        current = self._decode(window)
        if len(current) <= len(known) or current.endswith("\ufffd"):
            return ""
        delta = current[len(known) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta
