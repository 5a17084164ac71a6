"""One decode step of a baseline (full cache, H2O, StreamingLLM, FastV, random drop) at one
attention site, as a pure tensor function, like ``avl_decode.py`` for A-VL: fixed shapes, the
cache and state updated in place, no host sync, so it runs inside a compiled decode graph.

Slots (dim -2 of the cache), per batch row and the same count in every kv head:

    [kept rows | free]

The token goes to slot ``end``; every kept row is attended. Then at most one row per head
leaves (the budgets grow by at most one row per token, and a row over its budget is over by
one): H2O drops the older-than-recent row with the least accumulated attention, StreamingLLM
the oldest row outside its sink. The row's last slot fills the hole. Rows are not kept in
positional order: recency and the sink read each row's ``rank``, its index among the row's
tokens seen (padding excluded).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from avl_compile.lowering.slot_attention import slot_attention
from avl_compile.policies.avl_decode import move_last_slot_into
from avl_compile.policies.budgets import lightest

# what leaves the cache after a decode step
KEEP_ALL, DROP_OLDEST, DROP_LIGHTEST = "keep all", "drop oldest", "drop lightest"
# columns of the per-row counters
END, N_SEEN, NEXT_POSITION, N_PROTECTED = range(4)


@dataclasses.dataclass
class EvictionSlots:
    """State tensors of one layer's cache; slots align with the cache's dim -2."""

    position: Tensor  # [B, Hkv, C] int64, the token's position; -1 if free
    rank: Tensor  # [B, Hkv, C] int64, the token's index among the row's tokens seen; -1
    score: Tensor  # [B, Hkv, C] accumulated attention (H2O), 0 elsewhere
    counters: Tensor  # [B, 4] int64, columns END ... N_PROTECTED
    budget_options: Tensor  # [3] float64: kv_budget, h2o_heavy_share, streaming_sink

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.position, self.rank, self.score, self.counters, self.budget_options)

    @classmethod
    def empty(cls, batch: int, kv_heads: int, capacity: int, scores, device) -> EvictionSlots:
        """Uninitialised tensors of the right shapes and dtypes (examples for tracing)."""
        per_slot = (batch, kv_heads, capacity)
        return cls(
            position=torch.empty(per_slot, dtype=torch.long, device=device),
            rank=torch.empty(per_slot, dtype=torch.long, device=device),
            score=torch.empty(per_slot, dtype=scores, device=device),
            counters=torch.empty(batch, 4, dtype=torch.long, device=device),
            budget_options=torch.empty(3, dtype=torch.float64, device=device),
        )

    def grown(self, extra: int) -> EvictionSlots:
        """The same state with ``extra`` free slots at the end (a re-allocation)."""

        def pad(t: Tensor, value) -> Tensor:
            return torch.nn.functional.pad(t, (0, extra), value=value)

        return EvictionSlots(
            position=pad(self.position, -1),
            rank=pad(self.rank, -1),
            score=pad(self.score, 0.0),
            counters=self.counters,
            budget_options=self.budget_options,
        )


def eviction_decode_step(
    query: Tensor,
    new_keys: Tensor,
    new_values: Tensor,
    keys: Tensor,
    values: Tensor,
    slots: EvictionSlots,
    scale: float,
    eviction: str,
) -> Tensor:
    """Write the token into slot ``end``, attend every kept row, add the attention to the
    rows' scores (H2O), then evict at most one row per head by the policy's ``eviction``
    rule (known when the graph is built: it selects code, not data)."""
    batch, kv_heads, capacity = keys.shape[:3]
    counters = slots.counters
    rows = torch.arange(batch, device=keys.device).unsqueeze(1)  # [B, 1]
    heads = torch.arange(kv_heads, device=keys.device).unsqueeze(0)  # [1, Hkv]
    write = (rows, heads, counters[:, END].unsqueeze(1))
    keys.index_put_(write, new_keys[:, :, -1])
    values.index_put_(write, new_values[:, :, -1])
    per_head = (batch, kv_heads)
    slots.position.index_put_(write, counters[:, NEXT_POSITION, None].expand(per_head))
    slots.rank.index_put_(write, counters[:, N_SEEN, None].expand(per_head))
    slots.score.index_put_(write, slots.score.new_zeros(per_head))
    counters.add_(torch.tensor([1, 1, 1, 0], device=keys.device))

    kept = torch.arange(capacity, device=keys.device) < counters[:, END, None]  # [B, C]
    output, probs = slot_attention(query, keys, values, kept, scale)
    if eviction == DROP_LIGHTEST:
        grouped = probs.view(batch, kv_heads, -1, capacity).sum(dim=2)
        slots.score.add_(grouped.to(slots.score.dtype))
    if eviction != KEEP_ALL:
        _evict_one_row(slots, keys, values, kept, rows, heads, eviction)
    return output


def _evict_one_row(
    slots: EvictionSlots,
    keys: Tensor,
    values: Tensor,
    kept: Tensor,
    rows: Tensor,
    heads: Tensor,
    eviction: str,
) -> None:
    """Budget floor(kv_budget * tokens seen), at least 1. A row over it drops one row per
    head; the row's last slot fills the hole and becomes free."""
    counters = slots.counters
    kv_budget, heavy_share, sink = slots.budget_options.unbind()
    n_seen = counters[:, N_SEEN].to(torch.float64)
    budget = torch.clamp(torch.floor(kv_budget * n_seen), min=1.0)  # [B]
    end = counters[:, END]
    kept = kept.unsqueeze(1)  # [B, 1, C]
    if eviction == DROP_LIGHTEST:  # H2O: heavy hitters + the most recent
        n_recent = budget - torch.floor(heavy_share * budget)
        over = end > budget.to(end.dtype)
        older = kept & (slots.rank < (n_seen - n_recent).to(torch.long)[:, None, None])
        victim = lightest(slots.score, older, slots.position)  # [B, Hkv]
    else:  # StreamingLLM: the sink + the most recent
        n_protected = counters[:, N_PROTECTED]
        window = torch.clamp(budget.to(end.dtype) - n_protected, min=0)
        over = end - n_protected > window
        others = kept & (slots.rank >= sink.to(torch.long))
        oldest = torch.iinfo(torch.long).max
        victim = slots.position.masked_fill(~others, oldest).argmin(dim=-1)
    move_last_slot_into(
        victim, over, end, rows, heads,
        moved=(keys, values, slots.position, slots.rank, slots.score),
        emptied=((slots.position, -1), (slots.rank, -1), (slots.score, 0.0)),
    )  # fmt: skip
    counters[:, END] -= over.to(counters.dtype)
