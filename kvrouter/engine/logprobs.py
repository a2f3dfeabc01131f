"""Token log probabilities for the simulated engine's answers, in vLLM's shapes.

The engine samples no distribution, so the figures are synthetic but consistent: each
token's log probability is a fixed function of the token and its position, the sampled
token is always the most likely one (as greedy decoding would have it), and a step's
probabilities never sum past 1. The alternatives are other token ids with the rest of
the probability mass, halving from one to the next.

Pure: no asyncio, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from xxhash import xxh3_64_intdigest

from kvrouter.protocol import ChatLogprob, ChatLogprobContent, ChatLogprobs, CompletionLogprobs
from kvrouter.tokenizer import Tokenizer

__all__ = ["ChoiceScorer", "LogprobModel", "chat_logprobs", "completion_logprobs"]

# A step of the alternatives' token ids: odd, so it walks the whole of any vocabulary
# that is a power of two, and large, so neighbours differ.
_STRIDE = 7919
_SEED = 0x6C6F6770  # "logp"


class LogprobModel:
    """Synthetic log probabilities over a vocabulary of ``vocab_size`` ids.

    >>> model = LogprobModel(32000)
    >>> top = model.top(42, position=3, k=3)
    >>> [token for token, _ in top][0], len(top)
    (42, 3)
    >>> all(a[1] > b[1] for a, b in zip(top, top[1:]))  # sampled first, then falling
    True
    >>> sum(math.exp(lp) for _, lp in top) < 1
    True
    """

    __slots__ = ("vocab_size",)

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        self.vocab_size = vocab_size

    def probability(self, token_id: int, position: int) -> float:
        """The sampled token's probability: from 0.349 to 0.999, so it always outranks
        the best alternative, which gets at most half of what is left."""
        h = xxh3_64_intdigest(f"{token_id}:{position}".encode(), _SEED)
        x = (h % 10_000) / 10_000
        return 0.999 - 0.65 * x * x

    def logprob(self, token_id: int, position: int) -> float:
        return math.log(self.probability(token_id, position))

    def top(self, token_id: int, position: int, k: int) -> list[tuple[int, float]]:
        """The ``max(k, 1)`` most likely tokens of the step, the sampled one first."""
        p = self.probability(token_id, position)
        out = [(token_id, math.log(p))]
        rest = 1.0 - p
        vocab = self.vocab_size
        for j in range(1, min(k, vocab)):
            out.append(((token_id + j * _STRIDE) % vocab, math.log(rest * 0.5**j)))
        return out


def _offsets(tokens: Sequence[str], start: int) -> list[int]:
    """Where each token's text starts, counting from ``start`` (vLLM adds up the
    lengths of the decoded tokens the same way)."""
    out = []
    offset = start
    for token in tokens:
        out.append(offset)
        offset += len(token)
    return out


def completion_logprobs(
    model: LogprobModel,
    tokenizer: Tokenizer,
    token_ids: Sequence[int],
    first_position: int,
    num_top: int,
    *,
    text_offset: int = 0,
    num_unscored: int = 0,
) -> CompletionLogprobs:
    """``/v1/completions`` ``logprobs`` for ``token_ids`` at positions from
    ``first_position``: each token's text, log probability and its ``num_top`` best
    alternatives (one more entry when the sampled token is not among them, which here it
    always is). The first ``num_unscored`` tokens have none: the start of an echoed
    prompt, which nothing came before."""
    tokens = [tokenizer.decode([t]) for t in token_ids]
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    for i, token_id in enumerate(token_ids):
        if i < num_unscored:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        top = model.top(token_id, first_position + i, num_top)
        token_logprobs.append(top[0][1])
        alternatives: dict[str, float] = {}
        for alt, lp in top:
            alternatives.setdefault(tokenizer.decode([alt]), lp)
        top_logprobs.append(alternatives)
    return CompletionLogprobs(
        text_offset=_offsets(tokens, text_offset),
        token_logprobs=token_logprobs,
        tokens=tokens,
        top_logprobs=top_logprobs,
    )


def chat_logprobs(
    model: LogprobModel,
    tokenizer: Tokenizer,
    token_ids: Sequence[int],
    first_position: int,
    num_top: int,
) -> ChatLogprobs:
    """``/v1/chat/completions`` ``logprobs.content``: per token its text, bytes, log
    probability and exactly ``num_top`` alternatives (the sampled token first)."""
    out = []
    for i, token_id in enumerate(token_ids):
        top = model.top(token_id, first_position + i, num_top)
        token = tokenizer.decode([token_id])
        alternatives = [_chat_logprob(tokenizer.decode([t]), lp) for t, lp in top[:num_top]]
        out.append(
            ChatLogprobContent(
                token=token,
                logprob=top[0][1],
                bytes=list(token.encode("utf-8", errors="replace")),
                top_logprobs=alternatives,
            )
        )
    return ChatLogprobs(content=out)


def _chat_logprob(token: str, logprob: float) -> ChatLogprob:
    return ChatLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8", "replace")))


class ChoiceScorer:
    """The logprobs of one HTTP request's choices, scored piece by piece as their tokens
    come (a stream) or at once (a whole answer).

    Choice ``i`` answers ``prompts[i // n]``; with ``echo`` (completions), the first piece
    of a choice also scores its prompt, whose first token has no figure, as in vLLM.
    """

    __slots__ = (
        "_chat",
        "_echo",
        "_echoed",
        "_model",
        "_n",
        "_num_top",
        "_prompts",
        "_scored",
        "_tok",
    )

    def __init__(
        self,
        model: LogprobModel,
        tokenizer: Tokenizer,
        num_top: int,
        *,
        chat: bool,
        prompts: Sequence[Sequence[int]],
        n: int,
        echo: bool = False,
    ) -> None:
        self._model = model
        self._tok = tokenizer
        self._num_top = num_top
        self._chat = chat
        self._prompts = prompts
        self._n = n
        self._echo = echo and not chat
        self._scored: dict[int, int] = {}  # choice -> output tokens scored so far
        self._echoed: set[int] = set()  # choices whose prompt is scored

    def score(
        self, index: int, token_ids: Sequence[int], text_offset: int = 0
    ) -> CompletionLogprobs | ChatLogprobs:
        """The next ``token_ids`` of choice ``index``; ``text_offset``: how much of its
        text went before them."""
        prompt = self._prompts[index // self._n]
        done = self._scored.get(index, 0)
        self._scored[index] = done + len(token_ids)
        position = len(prompt) + done
        if self._chat:
            return chat_logprobs(self._model, self._tok, token_ids, position, self._num_top)
        if self._echo and index not in self._echoed:
            self._echoed.add(index)
            return completion_logprobs(
                self._model,
                self._tok,
                [*prompt, *token_ids],
                0,
                self._num_top,
                text_offset=text_offset,
                num_unscored=1,
            )
        return completion_logprobs(
            self._model, self._tok, token_ids, position, self._num_top, text_offset=text_offset
        )
