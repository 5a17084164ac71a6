"""Baselines that evict KV rows and attend densely to the rows left (full cache, H2O,
StreamingLLM, FastV, random drop): one base class; each baseline says what it keeps.

After prefill the cache holds, per batch row and kv head, the kept rows in positional order,
then free slots (rows of a batch may keep different counts); the decode step itself is
``eviction_decode.py``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from avl_compile.lowering.gathered_attention import pick_rows
from avl_compile.options import AvlOptions
from avl_compile.policies.budgets import fraction_count
from avl_compile.policies.common import (
    PrefillContext,
    column_sums,
    key_is_valid,
    prefill_attention,
    prefill_logits_bias,
    score_dtype,
)
from avl_compile.policies.decode_schedule import (
    DecodeSchedule,
    LayerState,
    begin_step_and_grow,
    spare_slots,
)
from avl_compile.policies.eviction_decode import (
    DROP_LIGHTEST,
    DROP_OLDEST,
    KEEP_ALL,
    EvictionSlots,
    eviction_decode_step,
)


@dataclasses.dataclass(kw_only=True)
class EvictionSchedule(DecodeSchedule):
    """The host's side of one layer's decode: kept rows per batch row follow from the
    budget alone (floor(kv_budget * tokens seen)), never from scores."""

    eviction: str  # KEEP_ALL, DROP_OLDEST or DROP_LIGHTEST
    kv_budget: float
    end: list[int]  # per batch row: kept rows
    n_seen: list[int]  # tokens seen, kept or not (padding excluded)
    n_protected: list[int]  # rows never evicted (StreamingLLM's sink)
    attended: list[int] = dataclasses.field(default_factory=list)  # this step's rows
    # the first layer's schedule, where every layer's cache must be as long as the first's
    # (HF sizes an explicit mask from the first layer's cache; FastV's later layers hold
    # fewer rows); None: this cache grows on its own
    leader: EvictionSchedule | None = None

    def growth(self, capacity: int, started: bool = True) -> int:
        if self.leader is not None:
            return self.leader.growth(capacity, started)
        return super().growth(capacity, started)

    def growth_between_steps(self, capacity: int) -> int:
        if self.leader is not None:
            return self.leader.growth_between_steps(capacity)
        return super().growth_between_steps(capacity)

    @property
    def decode_kind(self) -> str:
        # a budget of 100% never evicts: any rule's step is the full cache's
        return KEEP_ALL if self.kv_budget >= 1.0 else self.eviction

    @property
    def rows_in_use(self) -> int:
        return max(self.end)

    @property
    def attended_rows(self) -> float:
        return sum(self.attended) / len(self.attended)

    def advance(self) -> None:
        self.n_seen = [n + 1 for n in self.n_seen]
        self.attended = [e + 1 for e in self.end]
        if self.eviction == KEEP_ALL:
            self.end = self.attended
            return
        budgets = [eviction_budget(self.kv_budget, n) for n in self.n_seen]
        if self.eviction == DROP_OLDEST:
            budgets = [max(b, p) for b, p in zip(budgets, self.n_protected, strict=True)]
        self.end = [min(e, b) for e, b in zip(self.attended, budgets, strict=True)]


def eviction_budget(kv_budget: float, n_seen: int) -> int:
    """Rows H2O and StreamingLLM keep: floor(kv_budget * current length), at least one."""
    return max(fraction_count(kv_budget, n_seen), 1)


class EvictionPolicy:
    """Dense attention over the kept rows; subclasses choose the rows."""

    eviction = KEEP_ALL  # what leaves the cache at decode (eviction_decode.py)

    def __init__(self, options: AvlOptions, layer_idx: int) -> None:
        self.options = options
        self.layer_idx = layer_idx

    # -- what subclasses decide
    def prepare_prefill(self, query, keys, attn_mask, is_causal, scale, context) -> None:
        """Called at every layer before its prefill (FastV chooses its filter here)."""

    def visible_keys(self, context: PrefillContext) -> Tensor | None:
        """[B, L] keys the prefill may attend in this layer, None for all (FastV)."""
        return None

    def protected(self, key_valid: Tensor) -> Tensor:
        """[B, L] prompt tokens never evicted."""
        return torch.zeros_like(key_valid)

    def prefill_keep(
        self, slots: Tensor, scores: Tensor, n_seen: list[int], context: PrefillContext
    ) -> Tensor:
        """[B, Hkv, L] prompt rows to keep; ``slots`` marks the valid, visible ones."""
        return slots

    def min_cache_width(self, not_padding: Tensor, attn_mask: Tensor | None) -> int:
        """Fewest slots the prefill leaves in the cache (the rest padded with empty slots)."""
        return 0

    # -- the mechanics
    def prefill(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        scale: float,
        context: PrefillContext,
    ) -> tuple[Tensor, Tensor, Tensor, LayerState]:
        batch, q_len = query.shape[0], query.shape[2]
        kv_heads, k_len = keys.shape[1], keys.shape[2]
        device = query.device
        bias = prefill_logits_bias(attn_mask, is_causal, q_len, k_len, device)
        visible = self.visible_keys(context)
        output, bias = prefill_attention(
            query, keys, values, attn_mask, is_causal, scale, bias, visible
        )
        not_padding = key_is_valid(attn_mask, batch, k_len, device)
        key_valid = not_padding if visible is None else not_padding & visible
        shape = (batch, kv_heads, k_len)
        if self.eviction == DROP_LIGHTEST:
            scores = column_sums(query, keys, bias, scale, key_valid[:, k_len - q_len :])
        else:
            scores = torch.zeros(shape, dtype=score_dtype(query.dtype), device=device)
        n_seen = not_padding.sum(-1).tolist()
        slots = key_valid[:, None, :].expand(shape)
        keep = self.prefill_keep(slots, scores, n_seen, context) & slots
        kept = keep[:, 0].sum(-1).tolist()  # the same count in every head of a row
        protected = self.protected(key_valid) & keep[:, 0]
        min_width = self.min_cache_width(not_padding, attn_mask)
        in_use = max(*kept, min_width)
        capacity = min(in_use + spare_slots(in_use), k_len)
        # the kept slots first, in positional order
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :capacity]
        still = keep.gather(-1, order)
        rank = (not_padding.cumsum(-1) - 1)[:, None, :].expand(shape)
        per_row = zip(kept, n_seen, protected.sum(-1).tolist(), strict=True)
        slots_state = EvictionSlots(
            position=order.masked_fill(~still, -1),
            rank=rank.gather(-1, order).masked_fill(~still, -1),
            score=scores.gather(-1, order).masked_fill(~still, 0.0),
            counters=torch.tensor(
                [[e, n, k_len, p] for e, n, p in per_row], dtype=torch.long, device=device
            ),
            budget_options=torch.tensor(
                [self.options.kv_budget, self.options.h2o_heavy_share,
                 self.options.streaming_sink],
                dtype=torch.float64, device=device,
            ),
        )  # fmt: skip
        schedule = EvictionSchedule(
            eviction=self.eviction,
            kv_budget=self.options.kv_budget,
            end=kept,
            n_seen=n_seen,
            n_protected=protected.sum(-1).tolist(),
            position=k_len,
        )
        if min_width:  # every layer as long as the first, which holds min_width rows
            if context.schedule is None:
                context.schedule = schedule
            else:
                schedule.leader = context.schedule
        # free slots hold copies of other rows; they are never attended
        return (
            output,
            pick_rows(keys, order),
            pick_rows(values, order),
            LayerState(slots=slots_state, schedule=schedule),
        )

    def decode(
        self,
        query: Tensor,
        past_keys: Tensor,
        new_keys: Tensor,
        past_values: Tensor,
        new_values: Tensor,
        scale: float,
        state: LayerState,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One decode step called from Python (the runtime-call wiring); a compiled decode
        graph runs the same ``eviction_decode_step`` inside the graph."""
        schedule, keys, values = begin_step_and_grow(state, past_keys, past_values)
        output = eviction_decode_step(
            query, new_keys, new_values, keys, values, state.slots, scale, self.eviction
        )
        return output, keys, values
