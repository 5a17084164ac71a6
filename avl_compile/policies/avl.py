"""A-VL adaptive attention at one decoder attention site, on a compacted KV cache.

Cache layout per batch row, the same in every kv head of the row (equal counts per part):

    [secondary image rows outside the core | sink | core image rows | kept text | free]

The sink is the prompt before the first image (never evicted). Every decode step attends ONE
contiguous span of slots, read in place: sink + core + text
``[others_end, text_end)``, or at a refresh step everything, ``[0, text_end)``. The cache
tensor has free slots at its end: a decode token is written in place into the first free
slot of its row instead of concatenating the whole cache (HF DynamicCache's per-step
``torch.cat``); a full cache is re-allocated with ``spare_slots`` free rows. A refresh that
changes the core set swaps the rows entering and leaving it; the H2O text trim moves only
text rows. Kept text stays in positional order (H2O's recency needs it); image rows may be
in any order (attention does not depend on it).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from avl_compile.lowering import attend_selected_rows
from avl_compile.lowering.gathered_attention import pick_rows
from avl_compile.options import AvlOptions
from avl_compile.policies.budgets import fraction_count, is_refresh_step, text_budget
from avl_compile.policies.common import (
    PrefillContext,
    column_sums,
    heavy_recent_keep,
    key_is_valid,
    last_token_image_filter,
    last_token_score,
    mask_to_index,
    prefill_attention,
    prefill_logits_bias,
    topk_positions,
)


def spare_slots(rows: int) -> int:
    """Free slots a cache of ``rows`` occupied rows gets when (re)allocated: about 3% (at
    least 8), so a re-allocation (one copy of the cache) comes once in rows / 32 tokens at most.
    The cache is never longer than the uncompressed sequence, so with nothing evicted (100%
    budgets) it is re-allocated at every step, as a concatenating cache would be."""
    return max(8, rows // 32)


@dataclasses.dataclass
class LayerCacheState:
    """Bookkeeping of one layer's compacted cache; slots align with the cache's dim -2.

    Part boundaries are per batch row (lists of B ints), shared by the kv heads."""

    position: Tensor  # [B, Hkv, C] long, original position of the slot's token, -1 if free
    text_score: Tensor  # [B, Hkv, C] accumulated attention of text slots, 0 elsewhere
    others_end: list[int]  # secondary image rows outside the core: slots [0, others_end)
    core_start: list[int]  # the sink is [others_end, core_start)
    text_start: list[int]  # the core set is [core_start, text_start)
    text_end: list[int]  # kept text is [text_start, text_end); free slots follow
    n_text: list[int]  # text tokens seen so far per row (kept or not)
    n_core: list[int]  # core size per row, floor(C * N)
    next_position: int  # position of the next decode token
    step: int = 0  # 0 after prefill; decode step t is the t-th decode forward
    attended_rows: float = 0.0  # rows attended at the last decode step, mean over batch rows

    @property
    def rows_in_use(self) -> int:
        """Occupied slots of the fullest batch row (the cache tensor also has free slots)."""
        return max(self.text_end)


def text_budgets(n_text: list[int], options: AvlOptions) -> list[int]:
    """A-VL's text budget per row: max(round(T * n_text), min)."""
    return [text_budget(n, options.text_keep, options.text_min_budget) for n in n_text]


def h2o_text_keep(
    text: Tensor, scores: Tensor, n_text: list[int], options: AvlOptions
) -> Tensor | None:
    """The text slots to keep [B, Hkv, L] under A-VL's text budget, or None if all fit:
    heavy hitters + most recent (H2O)."""
    budgets = text_budgets(n_text, options)
    return heavy_recent_keep(text, scores, budgets, options.text_heavy_share)


class AvlPolicy:
    """Prefill selection and decode attention of A-VL for one attention site."""

    def __init__(self, options: AvlOptions, layer_idx: int) -> None:
        self.options = options
        self.layer_idx = layer_idx

    # ---------------------------------------------------------------- prefill
    def prefill(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        scale: float,
        context: PrefillContext,
    ) -> tuple[Tensor, Tensor, Tensor, LayerCacheState]:
        opts = self.options
        batch, q_len = query.shape[0], query.shape[2]
        kv_heads, k_len = keys.shape[1], keys.shape[2]
        device = query.device
        bias = prefill_logits_bias(attn_mask, is_causal, q_len, k_len, device)
        filtered = self._filtered_keys(context)
        output, bias = prefill_attention(
            query, keys, values, attn_mask, is_causal, scale, bias, filtered
        )

        key_valid = key_is_valid(attn_mask, batch, k_len, device)
        if filtered is not None:
            key_valid = key_valid & filtered
        image_score = last_token_score(query, keys, bias, scale)
        text_scores = column_sums(query, keys, bias, scale, key_valid[:, k_len - q_len :])

        image_mask = context.image_mask
        positions = torch.arange(k_len, device=device)
        first_image_pos = image_mask.int().argmax(dim=-1, keepdim=True)  # [B, 1]
        text_mask = key_valid & ~image_mask & (positions >= first_image_pos)  # [B, Lk]
        n_text = text_mask.sum(-1).tolist()
        text_slots = text_mask[:, None, :].expand(batch, kv_heads, k_len)
        kept_text = h2o_text_keep(text_slots, text_scores, n_text, opts)
        kept_text = text_slots if kept_text is None else kept_text
        first_images = first_image_pos[:, 0].tolist()
        slot_rows: list[list[Tensor]] = []
        bounds: list[tuple[int, int, int, int]] = []
        for b in range(batch):
            image_pos = torch.nonzero(image_mask[b]).flatten()
            n_images = image_pos.numel()
            sink = positions[key_valid[b] & (positions < first_images[b])]
            candidates = image_pos
            if context.filter_keep is not None and self.layer_idx >= opts.prefill_filter_layer:
                candidates = torch.nonzero(context.filter_keep[b]).flatten()
            secondary = topk_positions(
                image_score[b], candidates, fraction_count(opts.vision_keep, n_images)
            )
            core = topk_positions(
                image_score[b], secondary, fraction_count(opts.vision_compute, n_images)
            )
            others = secondary[~torch.isin(secondary, core)]
            image_rows = torch.cat([others, sink, core])
            texts = [positions[kept_text[b, h]] for h in range(kv_heads)]
            slot_rows.append([torch.cat([image_rows, t]) for t in texts])
            bounds.append(
                (others.numel(), others.numel() + sink.numel(), image_rows.numel(),
                 image_rows.numel() + texts[0].numel())
            )  # fmt: skip

        in_use = max(end for *_, end in bounds)
        capacity = min(in_use + spare_slots(in_use), k_len)
        position = torch.full((batch, kv_heads, capacity), -1, dtype=torch.long, device=device)
        for b, rows in enumerate(slot_rows):
            for h, r in enumerate(rows):
                position[b, h, : r.numel()] = r
        safe = position.clamp(min=0)
        others_end, core_start, text_start, text_end = (list(x) for x in zip(*bounds, strict=True))
        text_score = text_scores.gather(2, safe).masked_fill(
            ~_slot_window(text_start, text_end, capacity, device).unsqueeze(1), 0.0
        )
        state = LayerCacheState(
            position=position,
            text_score=text_score,
            others_end=others_end,
            core_start=core_start,
            text_start=text_start,
            text_end=text_end,
            n_text=n_text,
            n_core=[fraction_count(opts.vision_compute, int(n)) for n in image_mask.sum(-1)],
            next_position=k_len,
        )
        # free slots hold copies of row 0; they are never attended
        return output, pick_rows(keys, safe), pick_rows(values, safe), state

    def _filtered_keys(self, context: PrefillContext) -> Tensor | None:
        if context.filter_keep is None or self.layer_idx < self.options.prefill_filter_layer:
            return None
        return ~context.image_mask | context.filter_keep

    def prepare_prefill(
        self,
        query: Tensor,
        keys: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        scale: float,
        context: PrefillContext,
    ) -> None:
        """Layer P - 1 chooses the image tokens that pass the optional FastV-style filter."""
        opts = self.options
        if opts.prefill_filter_keep is not None and self.layer_idx == opts.prefill_filter_layer - 1:
            context.filter_keep = last_token_image_filter(
                query, keys, attn_mask, is_causal, scale, context.image_mask,
                opts.prefill_filter_keep,
            )  # fmt: skip

    # ----------------------------------------------------------------- decode
    def decode(
        self,
        query: Tensor,
        past_keys: Tensor,
        new_keys: Tensor,
        past_values: Tensor,
        new_values: Tensor,
        scale: float,
        state: LayerCacheState,
    ) -> tuple[Tensor, Tensor, Tensor]:
        opts = self.options
        keys, values = _append_token(state, past_keys, new_keys, past_values, new_values)
        state.step += 1
        refresh = is_refresh_step(state.step, opts.refresh_every)

        # sink + core + text; at a refresh step, every secondary image row too
        starts = [0] * len(state.text_end) if refresh else state.others_end
        ranges = torch.tensor(
            [[(start, end)] for start, end in zip(starts, state.text_end, strict=True)],
            device=query.device,
        )
        output, lse = attend_selected_rows(query, keys, values, None, scale, ranges)
        spans = zip(starts, state.text_end, strict=True)
        state.attended_rows = sum(end - start for start, end in spans) / len(starts)

        text_lo, text_hi = min(state.text_start), max(state.text_end)
        text_probs = _span_probs(query, keys, lse, scale, text_lo, text_hi, state.text_score.dtype)
        text_probs = text_probs.sum(dim=2)
        if text_lo != max(state.text_start) or text_hi != min(state.text_end):
            in_text = _slot_window(state.text_start, state.text_end, text_hi, query.device)
            text_probs = text_probs.masked_fill(~in_text[:, None, text_lo:], 0.0)
        state.text_score[..., text_lo:text_hi] += text_probs
        if refresh and opts.refresh_every != -1:
            self._choose_core(state, query, keys, values, lse, scale)

        self._trim_text(state, keys, values)
        return output, keys, values

    def _choose_core(
        self, state: LayerCacheState, query: Tensor, keys: Tensor, values: Tensor,
        lse: Tensor, scale: float,
    ) -> None:  # fmt: skip
        """Re-rank the secondary image rows by this step's head-averaged attention; the top
        floor(C * N) become the core: rows entering and leaving the core swap slots."""
        width = max(state.text_start)
        device = keys.device
        probs = _span_probs(query, keys, lse, scale, 0, width, state.text_score.dtype)
        probs = probs.flatten(1, 2).mean(dim=1)  # head average, [B, width]
        others = _slots_before(state.others_end, width, device)
        core = _slot_window(state.core_start, state.text_start, width, device)
        counts = [
            min(n, o + t - c)
            for n, o, c, t in zip(
                state.n_core, state.others_end, state.core_start, state.text_start, strict=True
            )
        ]
        most = max(counts)
        if most <= 0:
            return
        top = torch.topk(probs.masked_fill(~(others | core), float("-inf")), most).indices
        ranked = torch.arange(most, device=device) < torch.tensor(counts, device=device)[:, None]
        chosen = torch.zeros_like(core).scatter_(1, top, ranked)
        entering, leaving = mask_to_index(chosen & others), mask_to_index(core & ~chosen)
        if entering.shape[-1]:
            # equal counts per row; a row's padding repeats its last pair, so that a padded
            # swap rewrites the same values (a row with no swap gets the pair (0, 0))
            n_swaps = (entering >= 0).sum(-1, keepdim=True)
            last = torch.arange(entering.shape[-1], device=device).minimum(n_swaps - 1)
            pick = last.clamp(min=0)
            entering = entering.gather(-1, pick).clamp(min=0)
            leaving = leaving.gather(-1, pick).clamp(min=0)
            _swap_slots(state, keys, values, entering, leaving)

    def _trim_text(self, state: LayerCacheState, keys: Tensor, values: Tensor) -> None:
        """H2O text budget: evicted text rows leave, the kept ones close ranks in order."""
        opts = self.options
        budgets = text_budgets(state.n_text, opts)
        kept = [e - s for s, e in zip(state.text_start, state.text_end, strict=True)]
        if all(k <= b for k, b in zip(kept, budgets, strict=True)):
            return
        lo, hi = min(state.text_start), max(state.text_end)
        device = keys.device
        text = _slot_window(state.text_start, state.text_end, hi, device)[:, lo:]
        text = text.unsqueeze(1).expand(-1, keys.shape[1], -1)
        keep = heavy_recent_keep(text, state.text_score[..., lo:hi], budgets, opts.text_heavy_share)
        # stable sort of the window: rows before the text and kept text stay (in order),
        # evicted text moves behind them, free slots stay last
        before_text = _slots_before(state.text_start, hi, device)
        rank = torch.where(keep, 0, torch.where(text, 1, 2))
        rank = rank.masked_fill(before_text[:, None, lo:], 0)
        order = torch.sort(rank.to(torch.int8), dim=-1, stable=True).indices
        for cache in (keys, values):
            cache[:, :, lo:hi] = pick_rows(cache[:, :, lo:hi], order)
        state.position[..., lo:hi] = state.position[..., lo:hi].gather(-1, order)
        state.text_score[..., lo:hi] = state.text_score[..., lo:hi].gather(-1, order)
        kept_now = keep[:, 0].sum(-1).tolist()
        state.text_end = [s + int(k) for s, k in zip(state.text_start, kept_now, strict=True)]
        free = ~_slots_before(state.text_end, hi, device)[:, None, lo:]
        state.position[..., lo:hi].masked_fill_(free, -1)
        state.text_score[..., lo:hi].masked_fill_(free, 0.0)


def _slot_window(start: list[int], stop: list[int], width: int, device) -> Tensor:
    """[B, width] bool: slot s of row b lies in [start[b], stop[b])."""
    slots = torch.arange(width, device=device)
    lo = torch.tensor(start, device=device).unsqueeze(1)
    hi = torch.tensor(stop, device=device).unsqueeze(1)
    return (slots >= lo) & (slots < hi)


def _slots_before(stop: list[int], width: int, device) -> Tensor:
    """[B, width] bool: slot s of row b lies before stop[b]."""
    return torch.arange(width, device=device) < torch.tensor(stop, device=device).unsqueeze(1)


def _append_token(
    state: LayerCacheState, keys: Tensor, new_keys: Tensor, values: Tensor, new_values: Tensor
) -> tuple[Tensor, Tensor]:
    """Write the decode token into the first free slot of each row, in place; re-allocate
    the cache with spare slots when a row has no free slot."""
    batch, kv_heads, capacity, _ = keys.shape
    if max(state.text_end) >= capacity:
        # never longer than the uncompressed sequence: HF pads its mask up to the cache length
        # otherwise (and torch 2.11 cannot trace that pad with symbolic sizes)
        grown = min(capacity + spare_slots(capacity), state.next_position + 1)
        keys, values = _grow(keys, grown), _grow(values, grown)
        pad = grown - capacity
        state.position = torch.nn.functional.pad(state.position, (0, pad), value=-1)
        state.text_score = torch.nn.functional.pad(state.text_score, (0, pad), value=0.0)
    if min(state.text_end) == max(state.text_end):  # every row writes the same slot
        slot = state.text_end[0]
        keys[:, :, slot] = new_keys[:, :, -1]
        values[:, :, slot] = new_values[:, :, -1]
        state.position[..., slot] = state.next_position
    else:
        rows = torch.arange(batch, device=keys.device)
        slots = torch.tensor(state.text_end, device=keys.device)
        keys[rows, :, slots] = new_keys[:, :, -1]
        values[rows, :, slots] = new_values[:, :, -1]
        state.position[rows, :, slots] = state.next_position
    state.text_end = [end + 1 for end in state.text_end]
    state.n_text = [n + 1 for n in state.n_text]
    state.next_position += 1
    return keys, values


def _grow(cache: Tensor, capacity: int) -> Tensor:
    grown = cache.new_empty((*cache.shape[:2], capacity, cache.shape[3]))
    grown[:, :, : cache.shape[2]] = cache
    grown[:, :, cache.shape[2] :] = cache[:, :, :1]  # free slots: copies of row 0, as at prefill
    return grown


def _swap_slots(
    state: LayerCacheState, keys: Tensor, values: Tensor, a: Tensor, b_: Tensor
) -> None:
    """Swap slot a[b, i] with slot b_[b, i] [B, n] in every kv head. A pair may repeat
    (same values written twice); pairs must not otherwise share a slot."""
    kv_heads = keys.shape[1]
    a, b_ = a[:, None].expand(-1, kv_heads, -1), b_[:, None].expand(-1, kv_heads, -1)
    for cache in (keys, values):
        rows_a, rows_b = pick_rows(cache, a), pick_rows(cache, b_)
        _put_rows(cache, a, rows_b)
        _put_rows(cache, b_, rows_a)
    pos_a, pos_b = state.position.gather(-1, a), state.position.gather(-1, b_)
    state.position.scatter_(-1, a, pos_b)
    state.position.scatter_(-1, b_, pos_a)


def _put_rows(cache: Tensor, slots: Tensor, rows: Tensor) -> None:
    """cache [B, H, L, D] (contiguous) at slots [B, H, n] = rows [B, H, n, D], in place."""
    batch, heads, length, dim = cache.shape
    base = torch.arange(batch * heads, device=slots.device).view(batch, heads, 1) * length
    cache.view(-1, dim).index_copy_(0, (base + slots).flatten(), rows.reshape(-1, dim))


def _span_probs(
    query: Tensor, keys: Tensor, lse: Tensor, scale: float, lo: int, hi: int, acc: torch.dtype
) -> Tensor:
    """Final softmax probabilities [B, Hkv, g, hi - lo] of cache slots [lo, hi) for the
    single query row (read in place); the caller masks slots that were not attended."""
    batch, q_heads = query.shape[:2]
    kv_heads = keys.shape[1]
    grouped = query[:, :, -1].reshape(batch, kv_heads, q_heads // kv_heads, -1).to(acc)
    logits = torch.matmul(grouped, keys[:, :, lo:hi].to(acc).transpose(-1, -2)) * scale
    return torch.exp(logits - lse[:, :, -1].reshape(batch, kv_heads, -1, 1).to(acc))
