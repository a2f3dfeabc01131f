"""Requests of the simulated engine: configuration, what a caller submits, what it gets
back, and the engine's own per-request state (tokens, blocks, lazy decode counters)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, overload

import numpy as np
import xxhash

from kvrouter.engine.block_manager import (
    Tokens,
    engine_hash_seed,
    engine_root_hash,
    hash_token_blocks,
    token_bytes,
    token_list,
)
from kvrouter.errors import ConfigError

__all__ = [
    "EngineConfig",
    "EngineRequest",
    "Request",
    "RequestOutput",
    "synthetic_token",
]

_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: consecutive positions spread out
_VECTOR_MIN = 32  # output tokens from which numpy generates them faster than a loop


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Settings of one simulated engine (vLLM's names; defaults from DESIGN 5)."""

    block_size: int = 64
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    watermark: float = 0.01
    speedup_ratio: float = 1.0
    dp_rank: int = 0
    vocab_size: int = 32000

    def __post_init__(self) -> None:
        for name in ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.watermark < 1.0:
            raise ConfigError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.speedup_ratio <= 0:
            raise ConfigError(f"speedup_ratio must be positive, got {self.speedup_ratio}")
        if self.vocab_size <= 1:
            raise ConfigError(f"vocab_size must be at least 2, got {self.vocab_size}")

    @property
    def watermark_blocks(self) -> int:
        """Free blocks an admission must leave behind."""
        return int(self.watermark * self.num_gpu_blocks)


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A request as the engine receives it: token ids in, up to ``max_tokens`` out."""

    request_id: str
    prompt_token_ids: Tokens  # a list of ints, an array("I") or a numpy array; not copied
    max_tokens: int
    lora_name: str | None = None
    cache_salt: str | None = None  # isolates the request's prefix cache (vLLM's cache_salt)
    # The engine never samples EOS, so these are satisfied by construction; they are
    # accepted so callers can pass vLLM's sampling parameters through unchanged.
    min_tokens: int = 0
    ignore_eos: bool = False
    # What fixes the synthetic output tokens (the request id when None): the same key
    # gives the same text, whatever id the engine runs the request under.
    seed_key: str | None = None


class RequestOutput(NamedTuple):
    """What one request produced in one step (or its end: ``finished`` is set)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int


def synthetic_token(seed: int, position: int, vocab_size: int) -> int:
    """The output token at ``position`` (1-based) of the request whose seed is ``seed``.

    A Weyl sequence: deterministic, spread over the vocabulary, one multiply per token.
    """
    return (seed + position * _GOLDEN) % vocab_size


class Request:
    """The engine's mutable state of one request.

    The prompt is kept as given (never copied or changed); output tokens go to their own
    list; :attr:`tokens` shows both as one sequence.
    """

    __slots__ = (
        "block_hashes",
        "block_ids",
        "cache_salt",
        "decode_base",
        "hash_seed",
        "lora_name",
        "max_tokens",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_output_tokens",
        "num_preemptions",
        "num_prompt_tokens",
        "num_reported_tokens",
        "num_tokens",
        "output_token_ids",
        "prompt",
        "request_id",
        "token_seed",
        "tokens",
        "vocab_size",
    )

    def __init__(
        self,
        request: EngineRequest,
        block_size: int,
        hash_prompt: bool,
        vocab_size: int = 32000,
    ) -> None:
        self.request_id = request.request_id
        self.prompt = request.prompt_token_ids
        self.num_prompt_tokens = len(self.prompt)
        self.num_tokens = self.num_prompt_tokens  # prompt + output tokens so far
        self.output_token_ids: list[int] = []
        self.tokens = _RequestTokens(self)
        self.max_tokens = request.max_tokens
        self.lora_name = request.lora_name
        self.hash_seed = engine_hash_seed(request.lora_name)
        self.cache_salt = request.cache_salt or None
        self.token_seed = xxhash.xxh3_64_intdigest(
            (request.seed_key or request.request_id).encode()
        )
        self.num_computed_tokens = 0
        self.num_output_tokens = 0
        self.num_reported_tokens = 0  # output tokens handed out in RequestOutputs so far
        self.vocab_size = vocab_size
        self.num_cached_tokens = -1  # set on first admission
        self.num_preemptions = 0
        self.block_ids: list[int] = []
        self.decode_base = 0  # the scheduler's window clock its counters are exact at
        self.num_cached_blocks = 0  # leading block_ids registered in the cache
        self.block_hashes: list[int] = []
        if hash_prompt:
            # Hashing checks the token ids of full blocks (it raises); then the tail.
            num_full = self.num_prompt_tokens // block_size
            self.ensure_hashes(num_full, block_size)
            token_bytes(self.prompt[num_full * block_size :])
        else:
            token_bytes(self.prompt)

    def materialize_outputs(self) -> list[int]:
        """The output tokens so far as a list, generating any not yet written down.

        With sparse outputs the scheduler only counts decode tokens; since a token is a
        function of (request, position), they are generated in bulk when read.
        """
        out = self.output_token_ids
        have = len(out)
        wanted = self.num_output_tokens
        if have < wanted:
            seed = self.token_seed
            vocab_size = self.vocab_size
            if wanted - have < _VECTOR_MIN:
                # synthetic_token(), inlined: this runs once per generated token.
                out.extend([(seed + p * _GOLDEN) % vocab_size for p in range(have + 1, wanted + 1)])
            else:
                # The same values in bulk: (s + p*g) % v == (s % v + p * (g % v)) % v, and
                # every term fits in int64 (p * (g % v) < 2**63 for any real length).
                positions = np.arange(have + 1, wanted + 1, dtype=np.int64)
                positions *= _GOLDEN % vocab_size
                positions += seed % vocab_size
                positions %= vocab_size
                out.extend(positions.tolist())
        return out

    def take_new_tokens(self) -> list[int]:
        """Output tokens not reported yet (they are marked reported)."""
        start = self.num_reported_tokens
        self.num_reported_tokens = self.num_output_tokens
        return self.materialize_outputs()[start : self.num_output_tokens]

    def token_source(self, num_blocks: int, block_size: int) -> Tokens:
        """Tokens to read the first ``num_blocks`` full blocks from: the prompt as given
        (a numpy prompt is not copied) while they lie within it, else the view that
        includes output tokens."""
        if num_blocks * block_size <= self.num_prompt_tokens:
            return self.prompt
        return self.tokens

    def ensure_hashes(self, num_blocks: int, block_size: int) -> list[int]:
        """Engine hashes of the first ``num_blocks`` full blocks, computed once each."""
        hashes = self.block_hashes
        have = len(hashes)
        if num_blocks > have:
            parent = hashes[-1] if hashes else engine_root_hash(self.cache_salt)
            hashes.extend(
                hash_token_blocks(
                    self.token_source(num_blocks, block_size),
                    have,
                    num_blocks,
                    block_size=block_size,
                    parent_hash=parent,
                    seed=self.hash_seed,
                )
            )
        return hashes


class _RequestTokens(Sequence[int]):
    """Prompt and output tokens of a request as one read-only sequence (slices are lists)."""

    __slots__ = ("_request",)

    def __init__(self, request: Request) -> None:
        self._request = request

    def __len__(self) -> int:
        return self._request.num_tokens

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        request = self._request
        if isinstance(index, int):
            return self[index : index + 1 or None][0]
        start, stop, stride = index.indices(request.num_tokens)
        assert stride == 1, "token views support contiguous slices only"
        split = request.num_prompt_tokens
        out: list[int] = []
        if start < split:
            out = token_list(request.prompt[start : min(stop, split)])
        if stop > split:
            out.extend(request.materialize_outputs()[max(start - split, 0) : stop - split])
        return out
