"""The KV indexer: a global prefix index of the blocks every worker holds.

>>> from kvrouter.index import KvIndexer
>>> indexer = KvIndexer(block_size=16)
>>> indexer.find_matches([1, 2, 3]).scores
{}
"""

from __future__ import annotations

from kvrouter.index.indexer import EventSource, KvIndexer
from kvrouter.index.values import REJECT_KINDS, IndexerStats, OverlapScores

__all__ = ["REJECT_KINDS", "EventSource", "IndexerStats", "KvIndexer", "OverlapScores"]
