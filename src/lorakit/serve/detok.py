"""Incremental detokenization: the text of a growing token list at O(1) tokenizer work per new token.

Decoding the whole output after every step costs O(n) per token, O(n²) per request (64 rows x 2048 tokens spends
over a minute in the tokenizer alone). Like TGI and vLLM, :class:`Detokenizer` decodes only a short window: the
tokens since the last *settled* point, with the few tokens before it as context, and takes the new characters as
``decode(window) - decode(context)``. Context matters: SentencePiece/WordPiece decoders drop or merge a word's
leading space depending on its neighbour, so a window decoded alone would lose it. A step whose window ends in an
incomplete UTF-8 sequence (``\\ufffd``, e.g. an emoji split over byte-level tokens) settles nothing; the characters
come out once the sequence completes. ``text`` is always the settled text; ``final()`` adds whatever is pending,
exactly what a full ``decode`` would show at that point.
"""
from __future__ import annotations

from typing import Any


class Detokenizer:
    __slots__ = ("tok", "ids", "text", "_prefix", "_read")

    def __init__(self, tok: Any):
        self.tok = tok
        self.ids: list[int] = []
        self.text = ""  # settled text: never changes once produced
        self._prefix = 0  # start of the context window (token index)
        self._read = 0  # tokens up to here are settled into ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if ids else ""

    def add(self, token: int) -> str:
        """Append one token; returns the characters this settled (possibly empty)."""
        self.ids.append(token)
        context = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if len(window) > len(context) and not window.endswith("\ufffd") and window.startswith(context):
            new = window[len(context):]
            self.text += new
            self._prefix, self._read = self._read, len(self.ids)
            return new
        if not window.startswith(context):  # a decoder that rewrites its context: settle from a full decode
            full = self._decode(self.ids)
            if not full.endswith("\ufffd") and full.startswith(self.text):
                new = full[len(self.text):]
                self.text = full
                self._prefix, self._read = max(0, len(self.ids) - 1), len(self.ids)
                return new
        return ""

    def final(self) -> str:
        """The settled text plus the pending tail, as a full decode of every token would show it."""
        if self._read == len(self.ids):
            return self.text
        context = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        return self.text + window[len(context):] if window.startswith(context) else self._decode(self.ids)
