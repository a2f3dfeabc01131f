"""Load metrics a worker reports (DESIGN 3.3; Dynamo's ``ForwardPassMetrics`` names)."""

from __future__ import annotations

import msgspec

__all__ = ["ForwardPassMetrics"]


class ForwardPassMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """One snapshot of a worker's load, as pushed by ``WorkerMetricsPublisher``.

    ``worker_id`` identifies the publisher; everything else is Dynamo's field set.
    """

    worker_id: int = 0
    request_active_slots: int = 0
    request_total_slots: int = 0
    num_requests_waiting: int = 0
    kv_active_blocks: int = 0
    kv_total_blocks: int = 0
    gpu_cache_usage_perc: float = 0.0
    gpu_prefix_cache_hit_rate: float = 0.0
    data_parallel_rank: int = 0
