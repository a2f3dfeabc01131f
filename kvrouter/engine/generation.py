"""One HTTP generation request of the simulated engine's server, as engine requests.

A request with ``P`` prompts and ``n`` choices per prompt is ``P * n`` engine requests;
their outputs meet in one queue and are counted here the way vLLM counts usage.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from kvrouter.engine import RequestOutput
from kvrouter.protocol import Usage

__all__ = ["Generation", "Waiter", "engine_request_ids"]


@dataclass(slots=True)
class Waiter:
    """Where one engine request's outputs go: its HTTP request's queue, at ``index``."""

    queue: asyncio.Queue[tuple[int, RequestOutput]]
    index: int
    started_s: float = 0.0  # loop time it was submitted (for the latency metrics)
    last_token_s: float | None = None  # loop time its latest tokens came


@dataclass(slots=True)
class Generation:
    """One HTTP generation request: its engine requests and running totals.

    Choice ``i`` (its engine request ``sub_ids[i]``) answers prompt ``i // n``. As in
    vLLM, usage counts each prompt's tokens (and cache hits) once, however many
    choices it has, and the output tokens of every choice.
    """

    request_id: str
    sub_ids: list[str]
    created: int
    n: int
    prompt_lens: list[int]
    echo_texts: list[str] | None = None  # per prompt, when the prompt is echoed
    queue: asyncio.Queue[tuple[int, RequestOutput]] = field(default_factory=asyncio.Queue)
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_open: int = 0
    response_id: str = ""  # the id the answer carries; ``request_id`` when empty

    def __post_init__(self) -> None:
        self.response_id = self.response_id or self.request_id

    def account(self, index: int, output: RequestOutput) -> None:
        if output.finished:
            self.finish(index, output.num_output_tokens, output.num_cached_tokens)

    def finish(self, index: int, num_output_tokens: int, num_cached_tokens: int) -> None:
        """Choice ``index`` is over: its tokens join the usage (its prompt's cache hits
        once per prompt, with its first choice)."""
        self.num_open -= 1
        self.num_output_tokens += num_output_tokens
        if index % self.n == 0:
            self.num_cached_tokens += num_cached_tokens

    def usage(self) -> Usage:
        num_prompt_tokens = sum(self.prompt_lens)
        return Usage.of(num_prompt_tokens, self.num_output_tokens, self.num_cached_tokens)

    def choice_usage(self, index: int, num_output_tokens: int) -> Usage:
        """vLLM's per-chunk usage (``continuous_usage_stats``): one choice so far."""
        prompt_tokens = self.prompt_lens[index // self.n]
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=num_output_tokens,
            total_tokens=prompt_tokens + num_output_tokens,
        )

    def echo(self, index: int) -> str:
        """What choice ``index``'s text starts with: its prompt when echoed."""
        return self.echo_texts[index // self.n] if self.echo_texts is not None else ""


def engine_request_ids(request_id: str, num_prompts: int, n: int) -> list[str]:
    """One engine request id per choice, in choice order (choice ``i`` answers prompt
    ``i // n``); a lone choice keeps ``request_id`` itself.

    >>> engine_request_ids("r", 2, 2)
    ['r-0-0', 'r-0-1', 'r-1-0', 'r-1-1']
    """
    bases = [f"{request_id}-{i}" for i in range(num_prompts)] if num_prompts > 1 else [request_id]
    if n == 1:
        return bases
    return [f"{base}-{j}" for base in bases for j in range(n)]
