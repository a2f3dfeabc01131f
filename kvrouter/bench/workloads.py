"""Workloads: the requests a benchmark sends, and when it sends them.

A prompt is described, not stored: a tuple of :class:`Segment` ``(content_id,
num_tokens)``. The tokens of a segment are a pure function of its content id and
the position inside it, so two prompts that start with the same segments start with
the same tokens, and a segment cut short is a prefix of the full one. That is all a
KV cache can tell apart, and it keeps a 12,000-request trace (145 M prompt tokens)
in a few megabytes: tokens are made on demand, one request at a time.

::

    Mooncake record  {"timestamp": 0, "input_length": 1100, "hash_ids": [7, 9, 4]}
    segments         (7, 512) (9, 512) (4, 76)        # the last block is partial
    tokens           f(7, 0..511) ++ f(9, 0..511) ++ f(4, 0..75)

Generators (all seeded): shared-prefix groups, multi-turn chat sessions, a no-reuse
baseline. Arrivals: trace timestamps divided by a speedup, Poisson at a rate, or a
fixed concurrency (a closed loop, run by the driver).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from kvrouter.errors import ConfigError

__all__ = [
    "BUILTIN_WORKLOADS",
    "MOONCAKE_BLOCK_TOKENS",
    "Arrivals",
    "Request",
    "Segment",
    "apply_arrivals",
    "builtin_workload",
    "load_mooncake_trace",
    "multi_turn_requests",
    "no_reuse_requests",
    "prefix_reuse_limit",
    "prompt_text",
    "shared_prefix_requests",
    "synthesize_tokens",
]

MOONCAKE_BLOCK_TOKENS = 512
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")
DEFAULT_VOCAB_SIZE = 32_000
# Token ids below this are left alone: real vocabularies keep special tokens there.
_FIRST_TOKEN_ID = 100
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Content ids of generated workloads live in disjoint ranges, so workloads never share.
_ID_STRIDE = 1 << 32


class Segment(NamedTuple):
    """``num_tokens`` tokens of the content named ``content_id``."""

    content_id: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload; its prompt tokens are built on demand.

    >>> r = Request("r0", 0.0, (Segment(7, 512), Segment(9, 100)), output_length=16)
    >>> r.input_length, len(r.token_ids())
    (612, 612)
    """

    request_id: str
    arrival_s: float
    segments: tuple[Segment, ...]
    output_length: int
    group_id: int | None = None
    session_id: int | None = None
    turn: int = 0

    @property
    def input_length(self) -> int:
        return sum(seg.num_tokens for seg in self.segments)

    def token_ids(
        self, vocab_size: int = DEFAULT_VOCAB_SIZE
    ) -> np.ndarray[Any, np.dtype[np.uint32]]:
        """The prompt's token ids (a fresh uint32 array)."""
        return synthesize_tokens(self.segments, vocab_size)

    def token_list(self, vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[int]:
        """The prompt's token ids as Python ints (for JSON bodies)."""
        return self.token_ids(vocab_size).tolist()  # type: ignore[no-any-return]


def synthesize_tokens(
    segments: Sequence[Segment], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> np.ndarray[Any, np.dtype[np.uint32]]:
    """Token ids of ``segments``: a splitmix64 mix of (content id, position).

    Vectorised over the whole prompt; nothing is cached, so memory stays flat.
    """
    if vocab_size <= _FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size must exceed {_FIRST_TOKEN_ID}, got {vocab_size}")
    lengths = np.fromiter((s.num_tokens for s in segments), dtype=np.int64, count=len(segments))
    ids = np.fromiter((s.content_id for s in segments), dtype=np.uint64, count=len(segments))
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint32)
    starts = (np.cumsum(lengths) - lengths).astype(np.uint64)
    # id * golden + position inside the segment, as global index + (id * golden - start);
    # uint64 arithmetic wraps, as splitmix64's does. Everything below works in place.
    x = np.arange(total, dtype=np.uint64)
    x += np.repeat(ids * _GOLDEN - starts, lengths)
    x ^= x >> np.uint64(30)
    x *= _MIX_1
    x ^= x >> np.uint64(27)
    x *= _MIX_2
    x ^= x >> np.uint64(31)
    # Into [first, vocab_size) by the high 32 bits times the span (no 64-bit division).
    x >>= np.uint64(32)
    x *= np.uint64(vocab_size - _FIRST_TOKEN_ID)
    x >>= np.uint64(32)
    tokens = x.astype(np.uint32)
    tokens += np.uint32(_FIRST_TOKEN_ID)
    return tokens


def prompt_text(request: Request, vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """A text prompt for servers that take text: one short word per token.

    Shared token prefixes give shared text prefixes; how a server's tokenizer splits
    the words is its own business, so block alignment is only approximate.
    """
    return " ".join(_word(t) for t in request.token_ids(vocab_size).tolist())


def _word(token_id: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return letters[token_id % 26] + letters[(token_id // 26) % 26] + str(token_id // 676)


# --------------------------------------------------------------------------- traces


def load_mooncake_trace(
    path: str | Path,
    *,
    limit: int | None = None,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
) -> list[Request]:
    """Read a Mooncake-format JSONL trace.

    Each line has ``timestamp`` (ms), ``input_length``, ``output_length`` and
    ``hash_ids`` (one id per ``block_tokens`` tokens; equal ids, equal content).
    ``arrival_s`` is the raw timestamp in seconds; see :func:`apply_arrivals`.
    """
    requests: list[Request] = []
    with Path(path).open("rb") as fh:
        for index, line in enumerate(itertools.islice(fh, limit)):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip(b"\r\n"))
                requests.append(_mooncake_request(index, record, block_tokens))
            except ValueError as exc:  # a JSONDecodeError is one too
                raise ConfigError(f"trace {path} line {index + 1}: {_why(exc)}") from exc
    return requests


def _why(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return str(exc)


def _mooncake_request(index: int, record: Any, block_tokens: int) -> Request:
    if not isinstance(record, dict) or any(key not in record for key in _MOONCAKE_KEYS):
        raise ValueError(f"not a Mooncake record (an object with {', '.join(_MOONCAKE_KEYS)})")
    try:
        hash_ids = [int(h) for h in record["hash_ids"]]
        input_length = int(record["input_length"])
        output_length = int(record["output_length"])
        timestamp_ms = float(record["timestamp"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"a field is not a number or a list of numbers ({exc})") from exc
    if not hash_ids or input_length > len(hash_ids) * block_tokens:
        raise ValueError(
            f"input_length {input_length} does not fit "
            f"{len(hash_ids)} blocks of {block_tokens} tokens"
        )
    segments = [Segment(h, block_tokens) for h in hash_ids]
    last = input_length - (len(hash_ids) - 1) * block_tokens
    segments[-1] = Segment(hash_ids[-1], last)
    return Request(
        request_id=f"trace-{index}",
        arrival_s=timestamp_ms / 1000.0,
        segments=tuple(segments),
        output_length=max(1, output_length),
    )


# ----------------------------------------------------------------------- generators


def shared_prefix_requests(
    *,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    seed: int = 0,
) -> list[Request]:
    """Groups of prompts that share a system prompt, then a unique question each.

    Requests of all groups are interleaved in a seeded random order; arrival times are
    0 until :func:`apply_arrivals` spreads them.
    """
    rng = random.Random(seed)
    base = (seed + 1) * _ID_STRIDE
    order = [(g, p) for g in range(num_groups) for p in range(prompts_per_group)]
    rng.shuffle(order)
    requests = []
    for group, prompt in order:
        question_id = base + num_groups + group * prompts_per_group + prompt
        segments = (Segment(base + group, system_prompt_len), Segment(question_id, question_len))
        requests.append(
            Request(f"group{group}-{prompt}", 0.0, segments, output_len, group_id=group)
        )
    return requests


def multi_turn_requests(
    *,
    num_sessions: int,
    turns: int,
    system_prompt_len: int,
    user_len: int,
    output_len: int,
    think_time_s: float = 5.0,
    session_gap_s: float = 1.0,
    seed: int = 0,
) -> list[Request]:
    """Chat sessions: each turn's prompt is the whole conversation so far.

    Turn ``k`` of a session is ``system + (user_0, answer_0) ... + user_k``; the
    answers are synthesised as ``output_len`` tokens. Sessions start
    ``session_gap_s`` apart (with seeded jitter) and a turn follows the previous one of
    its session after a think time drawn uniformly from 0.5x..1.5x ``think_time_s`` (so
    sessions drift apart, as real users do); the result is sorted by arrival.
    """
    rng = random.Random(seed)
    base = (seed + 1) * _ID_STRIDE + (1 << 31)
    requests = []
    next_id = itertools.count(base + num_sessions)
    for session in range(num_sessions):
        at_s = session * session_gap_s + rng.uniform(0.0, session_gap_s)
        history: list[Segment] = [Segment(base + session, system_prompt_len)]
        for turn in range(turns):
            history.append(Segment(next(next_id), user_len))
            requests.append(
                Request(
                    f"session{session}-turn{turn}",
                    at_s,
                    tuple(history),
                    output_len,
                    session_id=session,
                    turn=turn,
                )
            )
            history.append(Segment(next(next_id), output_len))
            at_s += think_time_s * rng.uniform(0.5, 1.5)
    requests.sort(key=lambda r: r.arrival_s)
    return requests


def no_reuse_requests(
    *, num_requests: int, input_len: int, output_len: int, seed: int = 0
) -> list[Request]:
    """Prompts that share nothing: the baseline where routing cannot help."""
    base = (seed + 1) * _ID_STRIDE + (3 << 30)
    return [
        Request(f"unique-{i}", 0.0, (Segment(base + i, input_len),), output_len)
        for i in range(num_requests)
    ]


# ------------------------------------------------------------------------- arrivals


@dataclass(frozen=True, slots=True)
class Arrivals:
    """When requests are sent.

    * ``trace``: each request's own ``arrival_s`` divided by ``speedup``;
    * ``poisson``: exponential gaps at ``rate`` requests per second (seeded);
    * ``concurrency``: a closed loop keeping ``concurrency`` requests in flight; the
      driver sends the next request when one finishes (arrival times are ignored).
    """

    kind: Literal["trace", "poisson", "concurrency"] = "trace"
    speedup: float = 1.0
    rate: float = 1.0
    concurrency: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("trace", "poisson", "concurrency"):
            raise ValueError(f"unknown arrival kind {self.kind!r}")
        for name in ("speedup", "rate", "concurrency"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def closed_loop(self) -> bool:
        return self.kind == "concurrency"


def apply_arrivals(requests: Iterable[Request], arrivals: Arrivals) -> list[Request]:
    """Requests with their ``arrival_s`` set by ``arrivals``, in arrival order.

    For a closed loop the order is kept and every arrival is 0.
    """
    items = list(requests)
    if arrivals.kind == "trace":
        start = min((r.arrival_s for r in items), default=0.0)
        out = [replace(r, arrival_s=(r.arrival_s - start) / arrivals.speedup) for r in items]
        out.sort(key=lambda r: r.arrival_s)
        return out
    if arrivals.kind == "poisson":
        rng = random.Random(arrivals.seed)
        now = 0.0
        out = []
        for r in items:
            out.append(replace(r, arrival_s=now))
            now += rng.expovariate(arrivals.rate)
        return out
    return [replace(r, arrival_s=0.0) for r in items]


# ---------------------------------------------------------------------- reuse limit


def prefix_reuse_limit(requests: Iterable[Request], block_size: int = 64) -> float:
    """The fraction of prompt tokens one infinite prefix cache would serve.

    Requests are taken in the given order (sort by arrival first); a request hits the
    longest prefix it shares with any earlier prompt, rounded down to whole
    ``block_size``-token blocks (partial blocks are never cached, as in vLLM). No
    router can beat this on any number of workers. Measured in tokens at
    ``block_size`` granularity; the shared Mooncake trace gives 0.3736 at 64 tokens
    and 0.3734 at 512.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    tree = _SegmentTree()
    hit_tokens = 0
    total_tokens = 0
    for request in requests:
        total_tokens += request.input_length
        hit_tokens += tree.insert(request.segments) // block_size * block_size
    return hit_tokens / total_tokens if total_tokens else 0.0


class _SegmentTree:
    """Every prompt seen so far, as a tree of segments.

    A node is a path of whole segments; ``_longest[(node, content_id)]`` is the most
    tokens of that content any prompt had right after the path. Walking one prompt
    costs one step per segment, not per token or block.
    """

    __slots__ = ("_children", "_longest")

    def __init__(self) -> None:
        self._children: dict[tuple[int, int, int], int] = {}
        self._longest: dict[tuple[int, int], int] = {}

    def insert(self, segments: Sequence[Segment]) -> int:
        """Add a prompt; return how many of its leading tokens an earlier one had."""
        node = 0
        shared = 0
        matching = True
        children = self._children
        longest = self._longest
        for content_id, num_tokens in segments:
            key = (node, content_id)
            seen = longest.get(key, 0)
            if matching:
                shared += min(seen, num_tokens)
            if num_tokens > seen:
                longest[key] = num_tokens
            edge = (node, content_id, num_tokens)
            child = children.get(edge)
            if child is None:
                child = len(children) + 1
                children[edge] = child
                # A different length before the next segment puts it elsewhere.
                matching = False
            node = child
        return shared


# ------------------------------------------------------------------- built-in sets

BUILTIN_WORKLOADS = ("multi-turn", "shared-prefix", "no-reuse")


def builtin_workload(name: str, *, scale: float = 1.0, seed: int = 0) -> list[Request]:
    """A ready-made generated workload (``scale`` multiplies the number of requests).

    * ``multi-turn``: 96 chat sessions of 8 turns (2048-token system prompt, 512-token
      user turns, 64-token answers, about 4 s think time): each turn reuses its
      session's history, which only the worker that served the previous turn holds;
    * ``shared-prefix``: 32 groups of 24 prompts (4096-token system prompt per group,
      256-token questions, 64-token answers);
    * ``no-reuse``: 600 unrelated 2048-token prompts.

    Arrival times are the generator's own (multi-turn) or 0; see :func:`apply_arrivals`.
    """
    if name == "multi-turn":
        return multi_turn_requests(
            num_sessions=max(1, round(96 * scale)),
            turns=8,
            system_prompt_len=2048,
            user_len=512,
            output_len=64,
            think_time_s=4.0,
            session_gap_s=0.1,
            seed=seed,
        )
    if name == "shared-prefix":
        return shared_prefix_requests(
            num_groups=32,
            prompts_per_group=max(1, round(24 * scale)),
            system_prompt_len=4096,
            question_len=256,
            output_len=64,
            seed=seed,
        )
    if name == "no-reuse":
        return no_reuse_requests(
            num_requests=max(1, round(600 * scale)), input_len=2048, output_len=64, seed=seed
        )
    raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(BUILTIN_WORKLOADS)}")
