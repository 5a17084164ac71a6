"""H2O (Zhang et al., 2023): heavy hitters + recent tokens over the whole sequence, per head."""

from __future__ import annotations

from torch import Tensor

from avl_compile.policies.common import PrefillContext, heavy_recent_keep
from avl_compile.policies.eviction import EvictionPolicy, eviction_budget
from avl_compile.policies.eviction_decode import DROP_LIGHTEST


class H2OPolicy(EvictionPolicy):
    """Budget floor(kv_budget * current length) per (row, kv head), split h2o_heavy_share
    heavy hitters (accumulated attention) / the rest most recent; re-chosen every step
    among the rows still kept (evicted rows never return)."""

    eviction = DROP_LIGHTEST

    def _keep(self, slots: Tensor, scores: Tensor, n_seen: list[int]) -> Tensor:
        budgets = [eviction_budget(self.options.kv_budget, n) for n in n_seen]
        keep = heavy_recent_keep(slots, scores, budgets, self.options.h2o_heavy_share)
        return slots if keep is None else keep

    def prefill_keep(
        self, slots: Tensor, scores: Tensor, n_seen: list[int], context: PrefillContext
    ) -> Tensor:
        return self._keep(slots, scores, n_seen)
