"""Continuous batching for the simulated engine (vLLM v1's scheduling rules, simplified).

Each step has a budget of ``max_num_batched_tokens`` tokens:

1. **Running requests first**, oldest first. A decoding request takes 1 token; a request
   still prefilling takes the rest of its prompt, cut to the remaining budget (chunked
   prefill). When a running request cannot get the blocks it needs, the *newest* running
   request is preempted (recompute: its blocks are freed and it goes back to the head of
   the waiting queue, to be prefilled again, prompt and output so far); this repeats
   until the blocks are found or the request preempted itself.
2. **Then waiting requests**, strictly first come first served, while there is budget, a
   free slot (``max_num_seqs``) and no preemption happened in this step. On admission the
   longest prefix of full cached blocks is reused (at least one token is always
   computed), and a request is admitted only if the free blocks left afterwards stay at
   or above the watermark (``watermark * num_gpu_blocks``); the watermark is waived when
   nothing is running, so the head of the queue can always make progress.

After the forward pass (:meth:`Scheduler.update`), every scheduled request's computed
tokens advance; blocks that became full are cached; a request whose tokens are all
computed samples one output token. Output tokens are synthetic: a deterministic function
of the request id and position, below ``vocab_size``. The engine never emits EOS, so
``min_tokens`` and ``ignore_eos`` hold trivially and a request finishes by ``length``.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import NamedTuple

from kvrouter.engine.block_manager import BlockManager
from kvrouter.engine.request import (
    EngineConfig,
    EngineRequest,
    Request,
    RequestOutput,
    synthetic_token,
)

__all__ = [
    "EngineConfig",
    "EngineRequest",
    "Request",
    "RequestOutput",
    "ScheduledBatch",
    "Scheduler",
    "synthetic_token",
]


class ScheduledBatch(NamedTuple):
    """One step's plan: who runs and how many tokens each computes."""

    requests: list[Request]
    num_new_tokens: list[int]
    num_prefill_tokens: int
    num_decodes: int
    num_preempted: int


class Scheduler:
    """Decides each step's batch and applies its results (see the module docstring)."""

    __slots__ = (
        "_alloc_at",
        "_block_manager",
        "_clock",
        "_config",
        "_finish_at",
        "_head_need",
        "_lazy",
        "_order",
        "num_output_tokens",
        "num_preemptions",
        "num_prefix_hit_tokens",
        "num_prefix_query_tokens",
        "running",
        "sparse_outputs",
        "waiting",
    )

    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, *, sparse_outputs: bool = False
    ) -> None:
        self._config = config
        # Report only first tokens and finishes (see update()); a virtual-time driver
        # needs nothing else and skips a RequestOutput per request per step.
        self.sparse_outputs = sparse_outputs
        self._block_manager = block_manager
        self.running: list[Request] = []
        self.waiting: deque[Request] = deque()
        # The blocked head's need, kept while only decode windows run (they keep it).
        self._head_need: tuple[Request, int, list[int]] | None = None
        # Lazy decode bookkeeping (see "decode windows" below).
        self._lazy = False
        self._clock = 0  # decode window steps run so far
        self._alloc_at: dict[int, list[Request]] = {}  # clock -> requests needing a block
        self._finish_at: list[tuple[int, int]] = []  # heap of (clock, index in running)
        self._order: dict[Request, int] = {}  # running request -> its index
        self.num_preemptions = 0
        self.num_output_tokens = 0  # sampled, over all requests
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    def add(self, request: Request) -> None:
        """Queue a new request at the back (FCFS)."""
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues and release its blocks (abort)."""
        self._sync()
        if request in self.waiting:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
        self._release(request)

    # -- scheduling --------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """Plan one step: running requests first, then admissions (FCFS)."""
        self._sync()
        requests: list[Request] = []
        num_new: list[int] = []
        budget = self._config.max_num_batched_tokens
        budget, num_prefill, num_decodes, num_preempted = self._schedule_running(
            requests, num_new, budget
        )
        if num_preempted == 0:
            num_prefill += self._schedule_waiting(requests, num_new, budget)
        return ScheduledBatch(requests, num_new, num_prefill, num_decodes, num_preempted)

    def _schedule_running(
        self, requests: list[Request], num_new: list[int], budget: int
    ) -> tuple[int, int, int, int]:
        """Schedule running requests; returns (budget left, prefill tokens, decodes, preempted)."""
        running = self.running
        block_size = self._config.block_size
        allocate = self._block_manager.allocate
        num_prefill = num_decodes = num_preempted = 0
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            computed = request.num_computed_tokens
            count = request.num_tokens - computed
            if count == 1 and request.num_output_tokens:
                # A decode: the hot path, one token, a new block only at a boundary.
                needed = 1 if computed >= len(request.block_ids) * block_size else 0
                num_decodes += 1
            else:
                count = min(count, budget)
                needed = (computed + count + block_size - 1) // block_size - len(request.block_ids)
                num_prefill += count
            if needed > 0:
                new_blocks = allocate(needed)
                while new_blocks is None:
                    victim = running.pop()
                    self._preempt(victim)
                    num_preempted += 1
                    if victim is request:
                        break
                    new_blocks = allocate(needed)
                if new_blocks is None:
                    # The request preempted itself and was the last one left to schedule.
                    if count == 1 and request.num_output_tokens:
                        num_decodes -= 1
                    else:
                        num_prefill -= count
                    break
                request.block_ids.extend(new_blocks)
            requests.append(request)
            num_new.append(count)
            budget -= count
            index += 1
        return budget, num_prefill, num_decodes, num_preempted

    def _schedule_waiting(self, requests: list[Request], num_new: list[int], budget: int) -> int:
        """Admit waiting requests in order; returns the prefill tokens scheduled."""
        config = self._config
        num_prefill = 0
        waiting = self.waiting
        running = self.running
        while waiting and budget > 0 and len(running) < config.max_num_seqs:
            request = waiting[0]
            count = self._admit(request, budget, waive_watermark=not running)
            if count == 0:
                break
            waiting.popleft()
            running.append(request)
            requests.append(request)
            num_new.append(count)
            budget -= count
            num_prefill += count
        return num_prefill

    def _admit(self, request: Request, budget: int, waive_watermark: bool) -> int:
        """Reserve blocks for a waiting request's first chunk; 0 when it must wait."""
        manager = self._block_manager
        block_size = self._config.block_size
        num_tokens = request.num_tokens
        # At least one token is computed, so only blocks entirely before the last token count.
        max_hit_blocks = (num_tokens - 1) // block_size
        hits: list[int] = []
        if manager.enable_prefix_caching and max_hit_blocks:
            hashes = request.ensure_hashes(max_hit_blocks, block_size)
            hits = manager.find_cached_prefix(hashes, max_hit_blocks)
        num_hit_tokens = len(hits) * block_size
        count = min(num_tokens - num_hit_tokens, budget)
        num_needed = (num_hit_tokens + count + block_size - 1) // block_size - len(hits)
        taken = num_needed + manager.count_unreferenced(hits)
        floor = 0 if waive_watermark else self._config.watermark_blocks
        if manager.num_free_blocks - taken < floor:
            return 0
        manager.touch(hits)
        new_blocks = manager.allocate(num_needed)
        assert new_blocks is not None, "free blocks were counted before allocating"
        request.block_ids = hits + new_blocks
        request.num_cached_blocks = len(hits)
        request.num_computed_tokens = num_hit_tokens
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit_tokens
            self.num_prefix_query_tokens += num_tokens
            self.num_prefix_hit_tokens += num_hit_tokens
        return count

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self._block_manager.free(request.block_ids)
        request.block_ids = []
        request.num_cached_blocks = 0

    # -- results -----------------------------------------------------------------------

    def update(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """Apply a step's forward pass: advance, cache full blocks, sample, finish.

        With :attr:`sparse_outputs`, a request reports only its first token and its
        finish (each output carries every token since the request's previous one).
        """
        block_size = self._config.block_size
        vocab_size = self._config.vocab_size
        sparse = self.sparse_outputs
        outputs: list[RequestOutput] = []
        append_output = outputs.append
        any_finished = False
        num_sampled = 0
        for request, count in zip(batch.requests, batch.num_new_tokens, strict=True):
            computed = request.num_computed_tokens + count
            request.num_computed_tokens = computed
            if computed // block_size > request.num_cached_blocks:
                self._cache_blocks(request, computed // block_size)
            if computed < request.num_tokens:
                continue  # a prefill chunk that did not reach the end
            num_output = request.num_output_tokens + 1
            request.num_output_tokens = num_output
            request.num_tokens += 1
            num_sampled += 1
            finished = num_output >= request.max_tokens
            if finished:
                any_finished = True
                self._release(request)
            if sparse:
                if num_output > 1 and not finished:
                    continue  # counted; the token is generated when someone reads it
                new_tokens = request.take_new_tokens()
            else:
                # Synthetic, deterministic in (request id, position): a Weyl sequence.
                token = synthetic_token(request.token_seed, num_output, vocab_size)
                request.output_token_ids.append(token)
                new_tokens = [token]
            append_output(
                RequestOutput(
                    request.request_id,
                    new_tokens,
                    finished,
                    "length" if finished else None,
                    request.num_prompt_tokens,
                    request.num_cached_tokens,
                    num_output,
                )
            )
        self.num_output_tokens += num_sampled
        if any_finished:
            self.running = [r for r in self.running if r.num_output_tokens < r.max_tokens]
        return outputs

    # -- decode windows -----------------------------------------------------------------
    #
    # While only decode windows run, running requests are kept *lazily*: each request's
    # counters are exact as of the window clock ``decode_base`` it was last touched at,
    # and all of them advance one token per window step. A request needs attention only
    # when it needs a new block (every block_size steps, at a clock value kept in
    # ``_alloc_at``) or finishes (``_finish_at``, a heap), so a window costs its steps
    # plus those requests, not every running request. Any other operation first brings
    # every request up to date (``_sync``).

    def _enter_windows(self) -> bool:
        """Start lazy bookkeeping if every running request decodes; False otherwise."""
        if self._lazy:
            return True
        running = self.running
        for request in running:
            if request.num_tokens - request.num_computed_tokens != 1 or not (
                request.num_output_tokens
            ):
                return False
        block_size = self._config.block_size
        clock = self._clock
        alloc_at = self._alloc_at
        finish_at = self._finish_at
        for index, request in enumerate(running):
            request.decode_base = clock
            key = clock + len(request.block_ids) * block_size - request.num_computed_tokens
            alloc_at.setdefault(key, []).append(request)
            finish_at.append((clock + request.max_tokens - request.num_output_tokens, index))
        heapq.heapify(finish_at)
        self._order = {request: index for index, request in enumerate(running)}
        self._lazy = True
        return True

    def _sync(self) -> None:
        """Bring every lazily kept request up to date and leave lazy bookkeeping.

        Also forgets the blocked head's need: anything but a window may change it (a
        finish, for one, may drop the last reference to a block of its prefix).
        """
        self._head_need = None
        if not self._lazy:
            return
        clock = self._clock
        for request in self.running:
            _advance(request, clock)
        self._alloc_at.clear()
        self._finish_at.clear()
        self._order = {}
        self._lazy = False

    def plan_decode_window(self, max_steps: int) -> list[int] | None:
        """New blocks needed at each of up to ``max_steps`` pure-decode steps, or ``None``.

        A window is possible only when every step in it would be the same decode-only
        batch: nothing could be admitted (no request waits, every slot is taken until a
        request finishes, or the head of the queue lacks blocks for the whole window),
        every running request decoding and within the token budget, no request finishing
        before the window's last step, and enough free blocks that no step would
        preempt. Its length is the returned list's length. Planning changes nothing
        a later :meth:`schedule` or :meth:`run_decode_window` would see.
        """
        running = self.running
        config = self._config
        budget = config.max_num_batched_tokens - len(running)
        if not running or budget < 0:
            return None
        head_need: tuple[int, list[int]] | None = None
        if self.waiting and len(running) < config.max_num_seqs:
            head_need = self._blocked_head_need(budget)
            if head_need is None:
                return None
        if not self._enter_windows():
            return None
        clock = self._clock
        steps = min(max_steps, self._finish_at[0][0] - clock)
        alloc_at = self._alloc_at
        block_size = config.block_size
        new_blocks = [0] * steps
        for step in range(steps):
            bucket = alloc_at.get(clock + step)
            if bucket:
                # A request needing a block at this step needs one every block_size steps.
                for later in range(step, steps, block_size):
                    new_blocks[later] += len(bucket)
        free = self._block_manager.num_free_blocks
        total = 0
        for step, count in enumerate(new_blocks):
            total += count
            if total > free:
                new_blocks = new_blocks[:step]
                break
        if head_need is not None and new_blocks:
            new_blocks = self._keep_head_blocked(new_blocks, *head_need)
        return new_blocks or None

    def _blocked_head_need(self, budget: int) -> tuple[int, list[int]] | None:
        """(blocks the head's admission would take, its hashes), or None if it could run.

        The same arithmetic as :meth:`_admit`, without side effects. The watermark
        applies: a window needs running requests.
        """
        manager = self._block_manager
        head = self.waiting[0]
        memo = self._head_need
        if memo is not None and memo[0] is head:
            # Only windows ran since: each kept the head's need and took free blocks.
            return memo[1], memo[2]
        block_size = self._config.block_size
        num_tokens = head.num_tokens
        max_hit_blocks = (num_tokens - 1) // block_size
        hashes: list[int] = []
        hits: list[int] = []
        if manager.enable_prefix_caching and max_hit_blocks:
            hashes = head.ensure_hashes(max_hit_blocks, block_size)[:max_hit_blocks]
            hits = manager.find_cached_prefix(hashes, max_hit_blocks)
        num_hit_tokens = len(hits) * block_size
        count = min(num_tokens - num_hit_tokens, budget)
        if count <= 0:
            return None  # no budget: the head waits for that, not for blocks
        num_needed = (num_hit_tokens + count + block_size - 1) // block_size - len(hits)
        taken = num_needed + manager.count_unreferenced(hits)
        if manager.num_free_blocks - taken >= self._config.watermark_blocks:
            return None
        self._head_need = (head, taken, hashes)
        return taken, hashes

    def _keep_head_blocked(self, new_blocks: list[int], taken: int, hashes: list[int]) -> list[int]:
        """Cut a window to the steps in which the blocked head provably stays blocked.

        Its need (``taken``) holds while no block of its prefix is evicted or stored:
        decode steps only take free blocks, so the free count only falls. An eviction
        is ruled out by looking at the free blocks the window will take (the head of
        the free queue); a store by the parent hash of the first block each request
        fills (a block can only equal one of the head's if its parent does).
        """
        manager = self._block_manager
        if manager.num_free_blocks - new_blocks[0] - taken >= self._config.watermark_blocks:
            return []  # the first step would admit it (after its own allocations)
        if not hashes:
            return new_blocks
        watched = set(hashes)
        limit = len(new_blocks)
        total = 0
        for position, block_hash in enumerate(manager.head_block_hashes(sum(new_blocks))):
            if block_hash in watched:
                # Keep only the steps that take fewer blocks than this one's position.
                for step, count in enumerate(new_blocks):
                    total += count
                    if total > position:
                        limit = step
                        break
                break
        block_size = self._config.block_size
        clock = self._clock
        alloc_at = self._alloc_at
        for key in range(clock, clock + limit + 1):
            for request in alloc_at.get(key, ()):
                # At clock ``key`` its last block is full; a block filled by then is cached.
                index = len(request.block_ids) - (1 if key > clock else 0)
                fill_at = key if key > clock else key + block_size
                if index >= len(hashes) or fill_at - clock >= limit:
                    continue
                if index and request.block_hashes[index - 1] != hashes[index - 1]:
                    continue  # a different parent: a different chain
                limit = fill_at - clock
        return new_blocks[:limit]

    def run_decode_window(self, num_steps: int) -> list[RequestOutput]:
        """Advance every running request by ``num_steps`` decode steps at once.

        Only after :meth:`plan_decode_window` allowed at least ``num_steps``. The end state
        equals ``num_steps`` single steps; each request reports one output carrying all
        its new tokens (with :attr:`sparse_outputs`, only a finishing request reports,
        and only requests that need a block or finish cost anything).
        """
        assert self._lazy, "run_decode_window() needs a plan_decode_window() first"
        start = self._clock
        end = self._clock = start + num_steps
        self.num_output_tokens += len(self.running) * num_steps
        touched: list[Request] = []
        alloc_at = self._alloc_at
        for key in range(start, end + 1):
            bucket = alloc_at.pop(key, None)
            if bucket:
                touched.extend(bucket)
        finish_at = self._finish_at
        running = self.running
        while finish_at and finish_at[0][0] <= end:
            touched.append(running[heapq.heappop(finish_at)[1]])
        if self.sparse_outputs:
            touched = sorted(set(touched), key=self._order.__getitem__)
        else:
            alloc_at.clear()  # every request reports, and is filed again
            touched = list(running)
        outputs: list[RequestOutput] = []
        finished: list[Request] = []
        for request in touched:
            if self._advance_in_window(request, end, outputs):
                finished.append(request)
        if finished:
            gone = set(finished)
            self.running = [r for r in running if r not in gone]
            # Finishes end a window, so the order map is rebuilt from the next plan.
            self._sync()
        return outputs

    def _advance_in_window(self, request: Request, end: int, outputs: list[RequestOutput]) -> bool:
        """Bring one request to window clock ``end``: blocks, cache, finish; True if done."""
        block_size = self._config.block_size
        num_steps = end - request.decode_base
        _advance(request, end)
        computed = request.num_computed_tokens
        needed = (computed + block_size - 1) // block_size - len(request.block_ids)
        if needed > 0:
            new_blocks = self._block_manager.allocate(needed)
            assert new_blocks is not None, "the window was planned within the free blocks"
            request.block_ids.extend(new_blocks)
        # Tokens sampled inside the window are computed by its later steps, so blocks
        # are cached once they are all known.
        if computed // block_size > request.num_cached_blocks:
            self._cache_blocks(request, computed // block_size)
        num_output = request.num_output_tokens
        finished = num_output >= request.max_tokens
        if finished:
            self._release(request)
        else:
            key = end + len(request.block_ids) * block_size - computed
            self._alloc_at.setdefault(key, []).append(request)
            if self.sparse_outputs:
                return False
        if self.sparse_outputs:
            new_tokens = request.take_new_tokens()
        else:
            new_tokens = request.materialize_outputs()[num_output - num_steps : num_output]
        outputs.append(
            RequestOutput(
                request.request_id,
                new_tokens,
                finished,
                "length" if finished else None,
                request.num_prompt_tokens,
                request.num_cached_tokens,
                num_output,
            )
        )
        return finished

    def _cache_blocks(self, request: Request, num_full: int) -> None:
        manager = self._block_manager
        start = request.num_cached_blocks
        if manager.enable_prefix_caching:
            block_size = self._config.block_size
            hashes = request.ensure_hashes(num_full, block_size)
            manager.cache_full_blocks(
                request.block_ids,
                start,
                num_full,
                block_hashes=hashes,
                token_ids=request.token_source(num_full, block_size),
                lora_name=request.lora_name,
                cache_salt=request.cache_salt,
            )
        request.num_cached_blocks = num_full


def _advance(request: Request, clock: int) -> None:
    """Bring a lazily kept decoding request's counters to window clock ``clock``."""
    steps = clock - request.decode_base
    if steps:
        request.num_computed_tokens += steps
        request.num_tokens += steps
        request.num_output_tokens += steps
        request.decode_base = clock
