"""The engine's per-request state: output tokens generated on demand."""

from __future__ import annotations

import pytest

from kvrouter.engine.request import EngineRequest, Request, synthetic_token


@pytest.mark.parametrize("steps", [[1], [5, 40], [31, 1, 300], [1000]])
@pytest.mark.parametrize("vocab_size", [1000, 32000, 151936])
def test_materialized_outputs_equal_the_token_function(steps: list[int], vocab_size: int) -> None:
    # Short runs are generated one by one, long ones in bulk with numpy; both must give
    # exactly synthetic_token's values, whatever the seed.
    request = Request(EngineRequest("req-7", [1, 2, 3], max_tokens=2000), 4, True, vocab_size)
    for count in steps:
        request.num_output_tokens += count
        out = request.materialize_outputs()
    expected = [synthetic_token(request.token_seed, p, vocab_size) for p in range(1, len(out) + 1)]
    assert len(out) == sum(steps)
    assert out == expected
    assert all(type(t) is int for t in out)
