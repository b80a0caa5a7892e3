"""Incremental detokenization with stop strings.

Decoding a growing id list one token at a time can split a multi-byte character or a
word-piece; the text of ``ids[prefix:]`` minus that of ``ids[prefix:read]`` gives the
new characters once they no longer end in U+FFFD. While a request with stop strings is
running, the last ``max(len(stop)) - 1`` characters are held back, so a streamed text is
never taken back when a stop string completes. With ``incremental=False`` (a request
nobody streams and no stop string to watch for) tokens are only collected, and the text is
decoded once, when asked for.
"""

from __future__ import annotations

__all__ = ["IncrementalDetokenizer"]


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str], *, incremental: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.incremental = incremental or bool(stop)
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def append(self, token_id: int) -> bool:
        """Add one token; True if a stop string now appears (the text is cut before it)."""
        if self.tokenizer is None or self.stopped:
            return False
        self.ids.append(token_id)
        if not self.incremental:
            return False
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            start = max(0, len(self.text) - self.holdback - 1)
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            hits = [(at, s) for s in self.stop
                    if (at := self.text.find(s, max(0, start - len(s)))) >= 0]
            if hits:
                at, self.matched = min(hits, key=lambda hit: hit[0])
                self.text = self.text[:at]
                self.stopped = True
        return self.stopped

    def visible(self, finished: bool) -> str:
        """The text safe to show: all of it when finished, else minus the hold-back."""
        if not self.incremental:
            if self.tokenizer is not None and self.read < len(self.ids):  # decode once
                self.text, self.read = self._decode(self.ids), len(self.ids)
            return self.text
        if finished and not self.stopped and self.read < len(self.ids):
            # the tail held back as an incomplete character (U+FFFD) is final now: the
            # finished text is the whole decode, as with incremental=False
            before = self._decode(self.ids[self.prefix:self.read])
            self.text += self._decode(self.ids[self.prefix:])[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        if finished or not self.holdback:
            return self.text
        return self.text[:max(0, len(self.text) - self.holdback)]
