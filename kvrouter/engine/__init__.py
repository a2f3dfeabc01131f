"""The simulated engine: a vLLM-like worker with a real paged KV cache (DESIGN 5).

The pure core (:mod:`.block_manager`, :mod:`.scheduler`, :mod:`.timing`, :mod:`.core`)
has no I/O and no clock; the HTTP server and the virtual-time simulator drive it.

>>> core = EngineCore(EngineConfig(), timing=DefaultTiming(), worker_id=0)
>>> core.add_request(EngineRequest("r1", list(range(100)), max_tokens=1))
>>> result = core.step()
>>> result.outputs[0].finish_reason, len(result.kv_events)
('length', 1)
"""

from __future__ import annotations

from kvrouter.engine.block_manager import BlockManager, BlockManagerStats
from kvrouter.engine.core import EngineCore, EngineStats, StepResult
from kvrouter.engine.scheduler import EngineConfig, EngineRequest, RequestOutput
from kvrouter.engine.timing import DefaultTiming, TableTiming, TimingModel, step_ms

__all__ = [
    "BlockManager",
    "BlockManagerStats",
    "DefaultTiming",
    "EngineConfig",
    "EngineCore",
    "EngineRequest",
    "EngineStats",
    "RequestOutput",
    "StepResult",
    "TableTiming",
    "TimingModel",
    "step_ms",
]
