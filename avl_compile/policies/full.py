"""The full cache: every row kept and attended (the baseline every budget is measured against)."""

from __future__ import annotations

from avl_compile.policies.eviction import EvictionPolicy


class FullCachePolicy(EvictionPolicy):
    """Keeps every prompt and generated token; only left padding leaves the cache."""
