"""Load metrics a worker reports (DESIGN 3.3; Dynamo's ``ForwardPassMetrics`` names)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from kvrouter.events.model import MAX_DP_RANK

__all__ = ["ForwardPassMetrics"]


# Checked when a snapshot is decoded (a pushed message that breaks them is malformed,
# counted and dropped): a NaN or a usage of 5 would poison every load average.
_Count = Annotated[int, msgspec.Meta(ge=0)]
_Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_Rank = Annotated[int, msgspec.Meta(ge=0, le=MAX_DP_RANK)]


class ForwardPassMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """One snapshot of a worker's load, as pushed by ``WorkerMetricsPublisher``.

    ``worker_id`` identifies the publisher; everything else is Dynamo's field set.
    """

    worker_id: int = 0
    request_active_slots: _Count = 0
    request_total_slots: _Count = 0
    num_requests_waiting: _Count = 0
    kv_active_blocks: _Count = 0
    kv_total_blocks: _Count = 0
    gpu_cache_usage_perc: _Fraction = 0.0
    gpu_prefix_cache_hit_rate: _Fraction = 0.0
    data_parallel_rank: _Rank = 0
