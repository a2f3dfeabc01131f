"""Clocks are injected so the same code runs live and in virtual time.

A clock is any zero-argument callable returning seconds as a float. Live code uses
:func:`time.monotonic`; the simulator and tests use :class:`ManualClock`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]

monotonic: Clock = time.monotonic


class ManualClock:
    """A clock that moves only when told to.

    >>> clock = ManualClock()
    >>> clock.advance(1.5)
    >>> clock()
    1.5
    """

    __slots__ = ("now_s",)

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, delta_s: float) -> None:
        if delta_s < 0:
            raise ValueError(f"cannot move a clock backwards by {delta_s} s")
        self.now_s += delta_s

    def set(self, now_s: float) -> None:
        if now_s < self.now_s:
            raise ValueError(f"cannot move a clock from {self.now_s} s back to {now_s} s")
        self.now_s = now_s
