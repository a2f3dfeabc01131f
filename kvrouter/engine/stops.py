"""Stop sequences: where a choice's text ends, as vLLM's output processor decides it.

A stop token id ends the choice with that token (its text is left out); a stop string
ends it at the string's first occurrence (left out unless ``include``). While a stream
runs, the last ``longest - 1`` characters are held back, since they may begin a stop
string that the next tokens complete.

>>> from kvrouter.tokenizer import ByteTokenizer
>>> tok = ByteTokenizer()
>>> check = StopCheck(tok, ("lo",), frozenset(), include=False)
>>> check.feed(tok.encode("hel"), final=False)
('he', None)
>>> check.feed(tok.encode("lo world"), final=False)
('l', 'lo')
"""

from __future__ import annotations

from collections.abc import Sequence

from kvrouter.tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["StopCheck"]


class StopCheck:
    """One choice's text so far, checked against its stop strings and stop token ids.

    After :meth:`feed` returns a stop reason the choice is over: ``num_tokens`` is how
    many of its tokens count as generated (the stop token included, as vLLM counts it).
    """

    __slots__ = ("_decoder", "_hold", "_ids", "_include", "_pending", "_stops", "num_tokens")

    def __init__(
        self,
        tokenizer: Tokenizer,
        stops: Sequence[str],
        stop_ids: frozenset[int],
        *,
        include: bool,
    ) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._stops = tuple(stops)
        self._ids = stop_ids
        self._include = include
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.num_tokens = 0

    def feed(self, token_ids: Sequence[int], final: bool) -> tuple[str, str | int | None]:
        """The text that may be sent now, and the stop reason (``None``: not stopped)."""
        stop_id: int | None = None
        taken = list(token_ids)
        for i, token in enumerate(taken):
            if token in self._ids:
                stop_id = token
                taken = taken[:i]
                break
        self.num_tokens += len(taken) + (stop_id is not None)
        self._pending += self._decoder.feed(taken, final=final or stop_id is not None)
        found = self._first_stop()
        if found is not None:
            at, stop = found
            end = at + len(stop) if self._include else at
            text, self._pending = self._pending[:end], ""
            return text, stop
        if stop_id is not None or final:
            text, self._pending = self._pending, ""
            return text, stop_id
        keep = len(self._pending) - self._hold if self._hold else len(self._pending)
        text, self._pending = self._pending[: max(keep, 0)], self._pending[max(keep, 0) :]
        return text, None

    def _first_stop(self) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = self._pending.find(stop)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        return best
