"""StreamingLLM (Xiao et al., 2024): the first tokens (attention sink) + a recent window."""

from __future__ import annotations

import torch
from torch import Tensor

from avl_compile.policies.common import PrefillContext
from avl_compile.policies.eviction import EvictionPolicy, eviction_budget
from avl_compile.policies.eviction_decode import DROP_OLDEST


class StreamingPolicy(EvictionPolicy):
    """Keeps the first ``streaming_sink`` tokens of each row for good, and fills the rest of
    the budget floor(kv_budget * current length) with the most recent tokens."""

    eviction = DROP_OLDEST

    def protected(self, key_valid: Tensor) -> Tensor:
        return key_valid & (key_valid.cumsum(-1) <= self.options.streaming_sink)

    def _keep(self, slots: Tensor, protected: Tensor, n_seen: list[int]) -> Tensor:
        budgets = [eviction_budget(self.options.kv_budget, n) for n in n_seen]
        window = torch.tensor(budgets, device=slots.device).view(-1, 1, 1)
        window = (window - (protected & slots).sum(-1, keepdim=True)).clamp(min=0)
        others = slots & ~protected
        from_end = others.flip(-1).cumsum(-1).flip(-1)  # 1 for the newest slot
        return (protected & slots) | (others & (from_end <= window))

    def prefill_keep(
        self, slots: Tensor, scores: Tensor, n_seen: list[int], context: PrefillContext
    ) -> Tensor:
        return self._keep(slots, self.protected(slots[:, 0])[:, None, :].expand_as(slots), n_seen)
