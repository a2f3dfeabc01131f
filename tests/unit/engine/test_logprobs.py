"""The simulated engine's synthetic log probabilities: consistent as a distribution."""

from __future__ import annotations

import math
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from kvrouter.engine.logprobs import ChoiceScorer, LogprobModel, completion_logprobs
from kvrouter.protocol import MAX_LOGPROBS, ChatLogprobs, CompletionLogprobs
from kvrouter.tokenizer import ByteTokenizer


@given(
    vocab=st.integers(2, 200_000),
    token=st.integers(0, 10**6),
    position=st.integers(0, 10**6),
    k=st.integers(0, MAX_LOGPROBS),
)
def test_a_step_is_a_distribution_with_the_sampled_token_on_top(
    vocab: int, token: int, position: int, k: int
) -> None:
    token %= vocab
    top = LogprobModel(vocab).top(token, position, k)
    assert len(top) == max(1, min(k, vocab))
    ids = [t for t, _ in top]
    assert ids[0] == token and len(set(ids)) == len(ids)
    assert all(0 <= t < vocab for t in ids)
    values = [lp for _, lp in top]
    assert all(a > b for a, b in pairwise(values))  # strictly falling
    assert sum(math.exp(v) for v in values) < 1
    assert LogprobModel(vocab).top(token, position, k) == top  # a fixed function


def test_completion_offsets_add_up_the_token_texts() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo", add_special_tokens=False)
    lp = completion_logprobs(LogprobModel(300), tok, ids, 10, 2, text_offset=5, num_unscored=1)
    assert len(lp.tokens) == len(ids) == 6  # 'é' is two byte tokens
    assert lp.text_offset[0] == 5
    steps = [b - a for a, b in pairwise(lp.text_offset)]
    assert steps == [len(t) for t in lp.tokens[:-1]]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None


def test_a_scorer_carries_positions_and_scores_an_echoed_prompt_once() -> None:
    tok = ByteTokenizer()
    model = LogprobModel(300)
    prompt = tok.encode("ab", add_special_tokens=False)
    out = tok.encode("xyz", add_special_tokens=False)
    scorer = ChoiceScorer(model, tok, 1, chat=False, prompts=[prompt], n=1, echo=True)
    first = scorer.score(0, out[:1])
    rest = scorer.score(0, out[1:], text_offset=3)
    assert isinstance(first, CompletionLogprobs) and isinstance(rest, CompletionLogprobs)
    assert first.tokens == ["a", "b", "x"] and rest.tokens == ["y", "z"]
    assert rest.text_offset == [3, 4]
    whole = completion_logprobs(model, tok, out, len(prompt), 1)
    assert first.token_logprobs[2:] + rest.token_logprobs == whole.token_logprobs
    chat = ChoiceScorer(model, tok, 0, chat=True, prompts=[prompt], n=2)
    scored = chat.score(1, out)
    assert isinstance(scored, ChatLogprobs) and scored.content is not None
    assert [c.top_logprobs for c in scored.content] == [[], [], []]
