"""Incremental detokenization and stop-string matching: each new token costs a decode of a few tokens, not of
the whole text, and a stop string is searched for only where it could newly end."""

from __future__ import annotations


class IncrementalText:
    # Tokens decoded again before the new ones, so multi-token characters and merged spaces come out right.
    CONTEXT = 6

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.longest_stop = max((len(s) for s in stops), default=0)
        self.text = ""
        self.prefix = 0  # tokens [prefix, read) decode to the end of `text`
        self.read = 0

    def append(self, ids: list[int]) -> str | None:
        """Extend the text to cover ids (all tokens so far); returns the stop string that now ends it, if any,
        after cutting the text before it."""
        if self.tokenizer is None:
            return None
        before = self.tokenizer.decode(ids[self.prefix:self.read])
        after = self.tokenizer.decode(ids[self.prefix:])
        if after.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return None
        new = after[len(before):] if after.startswith(before) else after
        start = len(self.text)
        self.text += new
        self.prefix = max(len(ids) - self.CONTEXT, 0) if len(ids) > self.CONTEXT else 0
        self.read = len(ids)
        if not self.stops:
            return None
        window_start = max(start - self.longest_stop + 1, 0)
        hits = [(self.text.find(s, window_start), s) for s in self.stops]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            return None
        at, stop = min(hits)
        self.text = self.text[:at]
        return stop
