"""One A-VL decode step at one attention site, as a pure tensor function.

It knows nothing of HF classes, Dynamo or the host: it takes the query, the new token's
K/V, the layer's fixed-capacity cache and the layer's state tensors, updates cache and state
in place and returns the attention output. Fixed shapes, no host sync, so the FX rewrite can
put it inside a compiled decode graph (and a serving engine could call it as it is).

Slots (dim -2 of the cache) have a role per batch row, shared by the row's kv heads:

    [other secondary image rows | sink | core image rows | kept text | free]

at prefill; a core re-pick changes roles (OTHER <-> CORE) without moving rows. Text slots
are contiguous, ``[text_start, text_end)``, with equal counts in every head (H2O evicts one
text row per head and step at most; the last text row fills its slot), so the next decode
token always goes to slot ``text_end``. Text rows are not kept in positional order: H2O's
recency reads each text row's rank among the row's text tokens (``text_rank``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from avl_compile.lowering.native_core_choice import C_BOUND_BOX_BYTES, core_choice
from avl_compile.lowering.native_core_choice import why_not_native as why_not_native_core_choice
from avl_compile.lowering.slot_attention import slot_attention, slot_logits
from avl_compile.policies.budgets import best_first, lightest
from avl_compile.policies.page_core import CorePages

FREE, OTHER, SINK, CORE, TEXT = 0, 1, 2, 3, 4  # slot roles; attended: role >= SINK
# columns of the per-row counters
TEXT_END, N_TEXT, NEXT_POSITION, N_CORE, TEXT_START = range(5)
# columns of the adaptive refresh's per-row state
LSE_DROP, CORE_LSE, ADAPTIVE_REFRESHES = range(3)


@dataclasses.dataclass
class AvlSlots:
    """State tensors of one layer's cache; slots align with the cache's dim -2."""

    role: Tensor  # [B, C] int8
    position: Tensor  # [B, Hkv, C] int64, the token's position; -1 if free
    text_rank: Tensor  # [B, Hkv, C] int64, the text token's rank among the row's text; -1
    text_score: Tensor  # [B, Hkv, C] accumulated attention of text slots, 0 elsewhere
    counters: Tensor  # [B, 5] int64, columns TEXT_END ... TEXT_START
    text_options: Tensor  # [3] float64: text_keep, text_heavy_share, text_min_budget
    # [B, C] the last query's scaled q.k with each slot, averaged over query heads: written
    # at every step where recall is on (its next swap ranks the resident image rows by it,
    # so it makes no pass of its own over the cache); unused otherwise
    last_qk: Tensor

    def tensors(self) -> tuple[Tensor, ...]:
        return (
            self.role, self.position, self.text_rank, self.text_score, self.counters,
            self.text_options, self.last_qk,
        )  # fmt: skip

    @classmethod
    def empty(cls, batch: int, kv_heads: int, capacity: int, scores, device) -> AvlSlots:
        """Uninitialised tensors of the right shapes and dtypes (examples for tracing)."""
        per_slot = (batch, kv_heads, capacity)
        return cls(
            role=torch.empty(batch, capacity, dtype=torch.int8, device=device),
            position=torch.empty(per_slot, dtype=torch.long, device=device),
            text_rank=torch.empty(per_slot, dtype=torch.long, device=device),
            text_score=torch.empty(per_slot, dtype=scores, device=device),
            counters=torch.empty(batch, 5, dtype=torch.long, device=device),
            text_options=torch.empty(3, dtype=torch.float64, device=device),
            last_qk=torch.empty(batch, capacity, dtype=scores, device=device),
        )

    def grown(self, extra: int) -> AvlSlots:
        """The same state with ``extra`` free slots at the end (a re-allocation)."""

        def pad(t: Tensor, value) -> Tensor:
            return torch.nn.functional.pad(t, (0, extra), value=value)

        return AvlSlots(
            role=pad(self.role, FREE),
            position=pad(self.position, -1),
            text_rank=pad(self.text_rank, -1),
            text_score=pad(self.text_score, 0.0),
            counters=self.counters,
            text_options=self.text_options,
            last_qk=pad(self.last_qk, 0.0),
        )


@dataclasses.dataclass
class PagedAvlSlots(AvlSlots):
    """A-VL's state with the query-aware core: each image slot's ordinal among the prompt's
    image tokens (its page: ordinal // ``core_page_size``; ``page_core.CorePages``), -1 for
    slots of no image token."""

    image_ordinal: Tensor = dataclasses.field(kw_only=True)  # [B, C] int64

    def tensors(self) -> tuple[Tensor, ...]:
        return (*super().tensors(), self.image_ordinal)

    @classmethod
    def empty(cls, batch: int, kv_heads: int, capacity: int, scores, device) -> PagedAvlSlots:
        plain = AvlSlots.empty(batch, kv_heads, capacity, scores, device)
        ordinal = torch.empty(batch, capacity, dtype=torch.long, device=device)
        return cls(*plain.tensors(), image_ordinal=ordinal)

    def grown(self, extra: int) -> PagedAvlSlots:
        ordinal = torch.nn.functional.pad(self.image_ordinal, (0, extra), value=-1)
        return PagedAvlSlots(*AvlSlots.grown(self, extra).tensors(), image_ordinal=ordinal)


@dataclasses.dataclass
class AdaptiveAvlSlots(AvlSlots):
    """A-VL's state with adaptive refresh: per batch row the threshold (nats), the core's
    log-sum-exp at the last refresh (NaN before the first decode step) and the refreshes
    the signal fired so far (the host reads them once, after generate)."""

    refresh_state: Tensor = dataclasses.field(kw_only=True)  # [B, 3] float64

    def tensors(self) -> tuple[Tensor, ...]:
        return (*super().tensors(), self.refresh_state)

    @classmethod
    def empty(cls, batch: int, kv_heads: int, capacity: int, scores, device) -> AdaptiveAvlSlots:
        plain = AvlSlots.empty(batch, kv_heads, capacity, scores, device)
        state = torch.empty(batch, 3, dtype=torch.float64, device=device)
        return cls(*plain.tensors(), refresh_state=state)

    def grown(self, extra: int) -> AdaptiveAvlSlots:
        grown = AvlSlots.grown(self, extra).tensors()
        return AdaptiveAvlSlots(*grown, refresh_state=self.refresh_state)


def grow_cache(cache: Tensor, extra: int) -> Tensor:
    """``cache`` [B, H, C, D] with ``extra`` more slots (zeros; free slots are never read)."""
    return torch.cat([cache, cache.new_zeros((*cache.shape[:2], extra, cache.shape[3]))], -2)


def move_last_slot_into(
    victim: Tensor,
    over: Tensor,
    end: Tensor,
    rows: Tensor,
    heads: Tensor,
    moved: tuple[Tensor, ...],
    emptied: tuple[tuple[Tensor, float], ...],
) -> Tensor:
    """An eviction's hole fill, in fixed shapes: in the batch rows flagged in ``over`` [B],
    each head's last occupied slot (``end`` - 1) moves into its ``victim`` slot [B, Hkv] in
    every tensor of ``moved`` [B, Hkv, C, ...], and becomes empty in ``emptied`` (tensor,
    empty value); elsewhere nothing changes. Returns the last slots [B, Hkv]."""
    last = (end - 1).unsqueeze(1).expand_as(victim)
    target = torch.where(over.unsqueeze(1), victim, last)  # last -> last: no move
    source, destination = (rows, heads, last), (rows, heads, target)
    for tensor in moved:
        tensor.index_put_(destination, tensor[source])
    freed = over.unsqueeze(1).expand_as(victim)
    for tensor, empty in emptied:
        tensor.index_put_(source, torch.where(freed, empty, tensor[source]))
    return last


def avl_decode_step(
    query: Tensor,
    new_keys: Tensor,
    new_values: Tensor,
    keys: Tensor,
    values: Tensor,
    slots: AvlSlots,
    scale: float,
    refresh: bool,
    core_pages: CorePages | None = None,
    combine_heads: Callable[[Tensor], Tensor] | None = None,
    keep_qk: bool = False,
) -> Tensor:
    """Write the token into slot ``text_end``, attend sink + core + text (every secondary
    image row too at a refresh step), add the text rows' attention to their scores, re-pick
    the core at a refresh step, then evict at most one text row per head (H2O).
    ``refresh`` is known on the host (the step counter), so it selects code, not data.
    With ``PagedAvlSlots`` the core is the query-aware one, chosen before attention at
    every step from the boxes of ``core_pages`` (``page_core.py``); no step attends the
    whole secondary set. ``combine_heads`` (tensor parallel, plain A-VL only) turns the
    refresh's head mean over this rank's heads into the mean over every rank's. With
    ``AdaptiveAvlSlots`` a batch row also refreshes when its core's log-sum-exp has fallen
    (``adaptive_refresh_rows``): data, so every step holds both paths, as flags.
    ``keep_qk`` (recall): the step's q.k with every slot goes to ``slots.last_qk``."""
    batch, kv_heads = keys.shape[:2]
    counters = slots.counters
    rows = torch.arange(batch, device=keys.device).unsqueeze(1)  # [B, 1]
    heads = torch.arange(kv_heads, device=keys.device).unsqueeze(0)  # [1, Hkv]
    slot = counters[:, TEXT_END].unsqueeze(1)  # [B, 1]
    write = (rows, heads, slot)
    keys.index_put_(write, new_keys[:, :, -1])
    values.index_put_(write, new_values[:, :, -1])
    per_head = (batch, kv_heads)
    slots.position.index_put_(write, counters[:, NEXT_POSITION, None].expand(per_head))
    slots.text_rank.index_put_(write, counters[:, N_TEXT, None].expand(per_head))
    slots.text_score.index_put_(write, slots.text_score.new_zeros(per_head))
    slots.role.index_put_((rows[:, 0], slot[:, 0]), slots.role.new_full((batch,), TEXT))
    step = torch.tensor([1, 1, 1, 0, 0], device=keys.device)
    counters.add_(step)

    role = slots.role
    if isinstance(slots, PagedAvlSlots):
        assert core_pages is not None, "the query-aware core needs its page boxes"
        choose_query_aware_core(query[:, :, -1], slots, core_pages)
        refresh = False
    refreshing, logits = None, None  # [B]: the batch rows that refresh, where that is data
    if isinstance(slots, AdaptiveAvlSlots):
        logits = slot_logits(query, keys, scale)
        refreshing = adaptive_refresh_rows(slots, logits, refresh)
        attend = torch.where(refreshing.unsqueeze(1), role != FREE, role >= SINK)
    else:
        attend = role != FREE if refresh else role >= SINK
    if keep_qk:
        logits = slot_logits(query, keys, scale) if logits is None else logits
        slots.last_qk.copy_(logits.mean(dim=1))
    output, probs = slot_attention(query, keys, values, attend, scale, logits)
    grouped = probs.view(batch, kv_heads, -1, probs.shape[-1]).sum(dim=2)
    is_text = (role == TEXT).unsqueeze(1)
    slots.text_score.add_(grouped.masked_fill(~is_text, 0.0).to(slots.text_score.dtype))
    if refreshing is not None:
        _repick_core(slots, probs.mean(dim=1), refreshing)
        _remember_core_lse(slots, logits, refreshing)
    elif refresh:
        score = probs.mean(dim=1)
        _repick_core(slots, score if combine_heads is None else combine_heads(score))
    _evict_one_text_row(slots, keys, values, rows, heads)
    return output


def core_lse(logits: Tensor, role: Tensor) -> Tensor:
    """Log-sum-exp of ``logits`` [B, Hq, C] over each row's core slots, averaged over query
    heads: [B] (-inf where the core is empty)."""
    masked = logits.masked_fill((role != CORE).unsqueeze(1), float("-inf"))
    return torch.logsumexp(masked, dim=-1).mean(dim=1)


def adaptive_refresh_rows(slots: AdaptiveAvlSlots, logits: Tensor, scheduled: bool) -> Tensor:
    """The batch rows [B] that refresh at this step: all at a ``scheduled`` refresh, else
    those whose core's log-sum-exp fell more than the threshold below its value at their
    last refresh (a NaN value, before the first decode step, never fires); the fired
    ones are counted."""
    state = slots.refresh_state
    lse = core_lse(logits, slots.role).to(state.dtype)
    fired = lse < state[:, CORE_LSE] - state[:, LSE_DROP]
    if scheduled:
        return torch.ones_like(fired)
    state[:, ADAPTIVE_REFRESHES] += fired.to(state.dtype)
    return fired


def _remember_core_lse(slots: AdaptiveAvlSlots, logits: Tensor, refreshed: Tensor) -> None:
    """After a refresh (or the first decode step) the watched value is the core's now."""
    state = slots.refresh_state
    renew = refreshed | state[:, CORE_LSE].isnan()
    lse = core_lse(logits, slots.role).to(state.dtype)
    state[:, CORE_LSE] = torch.where(renew, lse, state[:, CORE_LSE])


def choose_query_aware_core(
    query: Tensor, slots: PagedAvlSlots, core_pages: CorePages, native: bool = True
) -> None:
    """This step's core from its ``query`` [B, Hq, D]: the secondary rows whose pages'
    digests bound the query's attention highest (``CorePages.bound_per_slot``, then
    ``_repick_core``). On a CPU one call of C code, ``avl::core_choice`` (``native=False``:
    the tensor function)."""
    tensors = {
        "query": query, "low": core_pages.low, "high": core_pages.high,
        "image_ordinal": slots.image_ordinal, "role": slots.role, "position": slots.position,
        "counters": slots.counters,
    }  # fmt: skip
    if native and why_not_native_core_choice(tensors) is None:
        box_bytes = 2 * core_pages.low[0].numel() * core_pages.low.element_size()
        bound = core_pages.page_bounds(query) if box_bytes > C_BOUND_BOX_BYTES else None
        core_choice(query, core_pages.low, core_pages.high, bound, slots.image_ordinal,
                    slots.role, slots.position, slots.counters, core_pages.page_size)  # fmt: skip
        return
    candidate = (slots.role == OTHER) | (slots.role == CORE)
    _repick_core(slots, core_pages.bound_per_slot(query, slots.image_ordinal, candidate))


def _repick_core(slots: AvlSlots, score: Tensor, rows: Tensor | None = None) -> None:
    """The top n_core secondary image rows by this step's head-averaged attention ``score``
    [B, C] become the core (ties: rows already in the core, then the lower position), in
    the batch ``rows`` flagged [B] (default: all)."""
    role = slots.role
    candidate = (role == OTHER) | (role == CORE)
    if rows is not None:
        candidate = candidate & rows.unsqueeze(1)
    ranked = score.masked_fill(~candidate, float("-inf"))
    order = best_first(ranked, slots.position[:, 0], prefer=role == CORE)
    capacity = role.shape[-1]
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(capacity, device=order.device).expand_as(order)
    )
    chosen = rank < slots.counters[:, N_CORE, None]
    new_role = torch.where(chosen, CORE, OTHER).to(role.dtype)
    role.copy_(torch.where(candidate, new_role, role))


def _evict_one_text_row(
    slots: AvlSlots, keys: Tensor, values: Tensor, rows: Tensor, heads: Tensor
) -> None:
    """A-VL's text budget max(round(T * n_text), min): a row over it by one (it never is by
    more at decode) drops, per head, the older-than-recent text row with the least
    accumulated attention (ties: the higher position goes); the row's last text slot fills
    the hole and becomes free."""
    counters, role = slots.counters, slots.role
    text_keep, heavy_share, min_budget = slots.text_options.unbind()
    n_text = counters[:, N_TEXT].to(torch.float64)
    budget = torch.maximum(torch.round(text_keep * n_text), min_budget)
    n_recent = budget - torch.floor(heavy_share * budget)
    kept = counters[:, TEXT_END] - counters[:, TEXT_START]
    over = kept > budget.to(kept.dtype)  # [B]
    older = (role == TEXT).unsqueeze(1) & (
        slots.text_rank < (n_text - n_recent).to(torch.long)[:, None, None]
    )
    victim = lightest(slots.text_score, older, slots.position)  # [B, Hkv]
    last = move_last_slot_into(
        victim, over, counters[:, TEXT_END], rows, heads,
        moved=(keys, values, slots.position, slots.text_rank, slots.text_score),
        emptied=((slots.position, -1), (slots.text_rank, -1), (slots.text_score, 0.0)),
    )  # fmt: skip
    last_role = role[rows[:, 0], last[:, 0]]
    role.index_put_((rows[:, 0], last[:, 0]), torch.where(over, FREE, last_role).to(role.dtype))
    counters[:, TEXT_END] -= over.to(counters.dtype)
