"""Incremental detokenization with exact stop strings, for streaming.

Text is decoded over a sliding window of tokens (as vLLM does), so each step costs a few
tokens, not the whole output, and BPE spacing comes out as a full decode would give it. A
window whose text ends in U+FFFD is an unfinished multi-byte character: nothing is emitted
until its next token completes it. Text that could be the start of a stop string is held
back until it cannot be, so a stop string is cut exactly and never half-streamed.

The router streams with it; the offline `LLM` uses it for stop strings and streaming.
`decode` turns token ids into text (special tokens skipped), so any tokenizer fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Delta:
    text: str  # new text the client may show
    stopped: bool  # a stop string appeared: the text ends before it, the request is done


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text is in self._text
        self._text = ""  # decoded so far (may end with held-back text)
        self._sent = 0  # characters of self._text already emitted
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text[: self._sent]

    def add(self, token_ids: Sequence[int]) -> Delta:
        if self.stopped:
            return Delta("", True)
        self._ids += token_ids
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        return self._emit(final=False)

    def finish(self) -> Delta:
        """The request ended: release held-back text (and any incomplete character)."""
        if not self.stopped and self._read < len(self._ids):
            self._text += self._decode(self._ids[self._prefix:])[
                len(self._decode(self._ids[self._prefix:self._read])):]
            self._read = len(self._ids)
        return self._emit(final=True)

    def _emit(self, final: bool) -> Delta:
        if self._stop:
            # a stop string may span the previous emission's end
            start = max(0, self._sent - max(len(s) for s in self._stop) + 1)
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i != -1]
            if hits:
                cut = min(hits)
                delta = self._text[self._sent:cut]
                self._text, self._sent, self.stopped = self._text[:cut], cut, True
                return Delta(delta, True)
        end = len(self._text) if final else len(self._text) - self._held_back()
        end = max(end, self._sent)
        delta = self._text[self._sent:end]
        self._sent = end
        return Delta(delta, False)

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), best, -1):
                if s.startswith(self._text[-n:]):
                    best = n
                    break
        return best
