"""The candidate table, and turning a choice into a :class:`Decision`.

A :class:`WorkerTable` is a sequence of :class:`WorkerView` (what every policy takes)
that also keeps the views' load as numpy columns. The scheduler keeps one table of its
candidates and updates only the rows of workers whose load changed, so a policy can
score the whole fleet with a few vectorised operations and then correct, in Python,
only the workers that hold part of the prompt:

::

    columns (one row per candidate, in worker order)     request-dependent part
    prefill_tokens  active_blocks  load                  overlaps / shared_active
    ──────────────  ─────────────  ────                  ───────────────────────
         0              12         0.01   ─┐             only the few workers that
       512              40         0.05    ├─ base cost  hold some of the prompt get
        ...             ...         ...   ─┘  (numpy)    an exact Python-level cost

A worker that holds none of the prompt has a cost that depends on its own load and
the prompt's size only, which is what the vectorised part computes.

The selection helpers return exactly what a stable sort of every candidate would:
ranks with ties in worker-table order, and ties within ``TIE_TOL`` of the best broken
by the smaller index tree, then at random.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import overload

import numpy as np
import numpy.typing as npt

from kvrouter.events.model import WorkerKey
from kvrouter.routing.views import MAX_ROWS, CandidateScore, Decision, RequestView, WorkerView

__all__ = [
    "TIE_TOL",
    "FloatArray",
    "WorkerTable",
    "decide",
    "pick_tied",
    "top_ranked",
]

TIE_TOL = 1e-9
FloatArray = npt.NDArray[np.float64]


class WorkerTable(Sequence[WorkerView]):
    """Candidate views plus their load as float64 columns (read them, don't write them).

    >>> table = WorkerTable([WorkerView(WorkerKey(0), active_blocks=3), WorkerView(WorkerKey(1))])
    >>> table.active_blocks.tolist(), table.position(WorkerKey(1))
    ([3.0, 0.0], 1)
    """

    __slots__ = ("_pos", "_views", "active_blocks", "load", "prefill_tokens")

    def __init__(self, views: Iterable[WorkerView] = ()) -> None:
        self._views = list(views)
        num = len(self._views)
        self._pos = {view.worker: i for i, view in enumerate(self._views)}
        self.prefill_tokens: FloatArray = np.fromiter(
            (v.prefill_tokens for v in self._views), np.float64, num
        )
        self.active_blocks: FloatArray = np.fromiter(
            (v.active_blocks for v in self._views), np.float64, num
        )
        self.load: FloatArray = np.fromiter((v.load for v in self._views), np.float64, num)

    @classmethod
    def of(cls, workers: Sequence[WorkerView]) -> WorkerTable:
        """``workers`` itself if it is a table, else a new table of it."""
        return workers if isinstance(workers, WorkerTable) else cls(workers)

    def position(self, worker: WorkerKey) -> int | None:
        """The worker's row, or ``None`` if it is not in the table."""
        return self._pos.get(worker)

    @property
    def positions(self) -> Mapping[WorkerKey, int]:
        return self._pos

    def update(self, view: WorkerView) -> None:
        """Replace the row of ``view.worker`` (which must be in the table)."""
        i = self._pos[view.worker]
        self._views[i] = view
        self.prefill_tokens[i] = view.prefill_tokens
        self.active_blocks[i] = view.active_blocks
        self.load[i] = view.load

    def __len__(self) -> int:
        return len(self._views)

    @overload
    def __getitem__(self, index: int) -> WorkerView: ...

    @overload
    def __getitem__(self, index: slice) -> list[WorkerView]: ...

    def __getitem__(self, index: int | slice) -> WorkerView | list[WorkerView]:
        return self._views[index]

    def __iter__(self) -> Iterator[WorkerView]:
        return iter(self._views)

    def __repr__(self) -> str:
        return f"WorkerTable({self._views!r})"


def top_ranked(values: FloatArray, num: int, *, higher_is_better: bool) -> list[int]:
    """The first ``num`` indexes of a stable ranking from best to worst.

    Equal values keep index order, as ``sorted(range(n), key=values.__getitem__,
    reverse=higher_is_better)`` does; only ``num`` values are sorted.
    """
    keys = -values if higher_is_better else values
    if len(keys) > num:
        kth = np.partition(keys, num - 1)[num - 1]
        within = np.flatnonzero(keys <= kth)  # ascending index order; ties at kth included
    else:
        within = np.arange(len(keys))
    order = within[np.argsort(keys[within], kind="stable")]
    return [int(i) for i in order[:num]]


def pick_tied(
    values: FloatArray,
    *,
    higher_is_better: bool,
    request: RequestView,
    workers: Sequence[WorkerView],
    rng: random.Random,
) -> int:
    """The best index; among values within ``TIE_TOL`` of the best: the smallest tree,
    then a random one (drawn from the tied indexes in ascending order)."""
    # Every value is on one side of the best, so this is |value - best| <= TIE_TOL.
    gaps = values.max() - values if higher_is_better else values - values.min()
    tied = np.flatnonzero(gaps <= TIE_TOL).tolist()
    if len(tied) == 1:
        return tied[0]
    sizes = request.tree_sizes
    tree = [sizes.get(workers[i].worker, 0) for i in tied]
    smallest = min(tree)
    tied = [i for i, t in zip(tied, tree, strict=True) if t == smallest]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def _row(
    request: RequestView, view: WorkerView, score: float | None, selected: bool
) -> CandidateScore:
    worker = view.worker
    bs = request.block_size
    return CandidateScore(
        worker=worker,
        overlap_blocks=request.overlap(worker),
        hit_rate=request.hit_rate(worker),
        load=view.load,
        prefill_blocks=(view.prefill_tokens + request.uncached_tokens(worker)) / bs,
        decode_blocks=float(view.active_blocks + request.new_blocks(worker)),
        score=score,
        selected=selected,
    )


def _shown(num: int, chosen: int, scores: FloatArray | None, score_name: str | None) -> list[int]:
    """Indexes of the rows a decision keeps: all of a small fleet; of a large one, the
    chosen worker and the best others (rows cost more to build than the choice)."""
    if num <= MAX_ROWS:
        return list(range(num))
    if scores is None:
        order: Sequence[int] = range(MAX_ROWS)
    else:
        order = top_ranked(scores, MAX_ROWS, higher_is_better=score_name == "score")
    best = [i for i in order if i != chosen][: MAX_ROWS - 1]
    return sorted([chosen, *best])


def decide(
    policy: str,
    request: RequestView,
    workers: Sequence[WorkerView],
    chosen: int,
    *,
    scores: FloatArray | None = None,
    score_name: str | None = None,
) -> Decision:
    """The :class:`Decision` for ``workers[chosen]``, with rows for the candidates shown
    (``scores``, one per worker, rank them: ``"score"`` higher first, else lower)."""
    shown = _shown(len(workers), chosen, scores, score_name)
    values: list[float | None]
    if scores is None:
        values = [None] * len(shown)
    else:
        values = (scores if len(shown) == len(workers) else scores[shown]).tolist()
    rows = tuple(
        _row(request, workers[i], value, i == chosen)
        for i, value in zip(shown, values, strict=True)
    )
    worker = workers[chosen].worker
    return Decision(
        request_id=request.request_id,
        worker=worker,
        policy=policy,
        candidates=rows,
        score_name=score_name,
        num_blocks=request.num_blocks,
        overlap_blocks=request.overlap(worker),
        num_candidates=len(workers),
    )
