"""Incremental detokenization: text for a growing list of ids in O(1) per token.

Decoding the whole output after every token is O(n^2) over a generation (stop strings and
streaming did that). `IncrementalDetokenizer` decodes only a short window, the way
Hugging Face TGI and vLLM do: with `prefix` = ids[prefix_offset:read_offset] (already
emitted) and `window` = ids[prefix_offset:], the new text is decode(window) minus
decode(prefix). Decoding from a few tokens back, not from the new token alone, keeps
what a tokenizer does at word boundaries (SentencePiece's leading space, byte-level
merges) the same as in a full decode.

While the window's text ends in U+FFFD (a character whose bytes are split over tokens),
the text is held back, but never for more than MAX_PENDING tokens: UTF-8 needs at most
four bytes, so a longer run is text the model really produced (an invalid byte
sequence) and is emitted as it decodes, and a run of tokens that decodes to nothing
(special tokens) is skipped. A stream never stalls.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
MAX_PENDING = 4


class IncrementalDetokenizer:
    """`update(ids)` with the full id list so far (it only grows) -> the new text; ids
    before `start` (a prompt) are not part of the text."""

    __slots__ = ("_decode", "prefix_offset", "read_offset", "text")

    def __init__(self, decode: Callable[[list[int]], str], start: int = 0):
        self._decode = decode
        self.prefix_offset = self.read_offset = start
        self.text = ""

    def update(self, ids: Sequence[int]) -> str:
        if len(ids) <= self.read_offset:
            return ""
        prefix = self._decode(list(ids[self.prefix_offset:self.read_offset])) \
            if self.read_offset > self.prefix_offset else ""
        window = self._decode(list(ids[self.prefix_offset:]))
        pending = len(ids) - self.read_offset
        if window.endswith(REPLACEMENT) and pending < MAX_PENDING:
            return ""  # a character still incomplete: wait for its next byte
        if len(window) <= len(prefix):
            if pending >= MAX_PENDING:  # tokens that decode to nothing (special ones)
                self.prefix_offset = self.read_offset = len(ids)
            return ""
        # As in vLLM: what the window adds beyond the prefix's length, even where a
        # tokenizer rewrote the prefix's text (never seen with the real models).
        delta = window[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self.text += delta
        return delta
