"""A-VL adaptive attention at one decoder attention site, on a compacted KV cache.

Cache layout per (batch row, kv head) after prefill: [sink prefix | secondary image rows |
kept text rows | empty slots], each part in positional order; decode tokens are appended.
Every slot carries its original (padded) position, its kind and, for text, its accumulated
attention. Decode attention is split by modality: core image rows (shared by the heads of the
layer) as an index list, sink and kept text as contiguous spans of slots, in one gathered
attention call (the whole secondary set is a span too at refresh steps).
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
    mask_to_ranges,
    prefill_attention,
    prefill_logits_bias,
    topk_positions,
)

EMPTY, SINK, IMAGE, TEXT = 0, 1, 2, 3


@dataclasses.dataclass
class LayerCacheState:
    """Bookkeeping of one layer's compacted cache; slots align with the cache's dim -2."""

    position: Tensor  # [B, Hkv, L] long, original position, -1 for an empty slot
    kind: Tensor  # [B, Hkv, L] int8: EMPTY, SINK, IMAGE or TEXT
    core: Tensor  # [B, Hkv, L] bool, image rows attended on non-refresh steps
    text_score: Tensor  # [B, Hkv, L] accumulated attention of text rows
    n_text: list[int]  # text tokens seen so far per row (kept or not)
    n_core: list[int]  # core size per row, floor(C * N)
    next_position: int  # position of the next decode token
    step: int = 0  # 0 after prefill; decode step t is the t-th decode forward
    attended_rows: float = 0.0  # rows attended at the last decode step, mean over batch rows


def h2o_text_keep(
    text: Tensor, scores: Tensor, n_text: list[int], options: AvlOptions
) -> Tensor | None:
    """The text slots to keep [B, Hkv, L] under A-VL's text budget, or None if all fit:
    budget max(round(T * n_text), min) per row, heavy hitters + most recent (H2O)."""
    budgets = [text_budget(n, options.text_keep, options.text_min_budget) for n in n_text]
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
        bias = prefill_logits_bias(attn_mask, is_causal, q_len, k_len, query.device)
        filtered = self._filtered_keys(context)
        output, bias = prefill_attention(
            query, keys, values, attn_mask, is_causal, scale, bias, filtered
        )

        key_valid = key_is_valid(attn_mask, batch, k_len, query.device)
        if filtered is not None:
            key_valid = key_valid & filtered
        image_score = last_token_score(query, keys, bias, scale)
        text_scores = column_sums(query, keys, bias, scale, key_valid[:, k_len - q_len :])

        image_mask = context.image_mask
        positions = torch.arange(k_len, device=query.device)
        first_image_pos = image_mask.int().argmax(dim=-1, keepdim=True)  # [B, 1]
        text_mask = key_valid & ~image_mask & (positions >= first_image_pos)  # [B, Lk]
        n_text = text_mask.sum(-1).tolist()
        text_slots = text_mask[:, None, :].expand(batch, kv_heads, k_len)
        kept_text = h2o_text_keep(text_slots, text_scores, n_text, opts)
        kept_text = text_slots if kept_text is None else kept_text
        slot_rows: list[list[Tensor]] = []
        first_images = first_image_pos[:, 0].tolist()
        n_core = []
        core_positions: list[Tensor] = []
        for b in range(batch):
            valid = key_valid[b]
            image_pos = torch.nonzero(image_mask[b]).flatten()
            n_images = image_pos.numel()
            sink = positions[valid & (positions < first_images[b])]
            image_candidates = image_pos
            if context.filter_keep is not None and self.layer_idx >= opts.prefill_filter_layer:
                image_candidates = torch.nonzero(context.filter_keep[b]).flatten()
            secondary = topk_positions(
                image_score[b], image_candidates, fraction_count(opts.vision_keep, n_images)
            )
            core = topk_positions(
                image_score[b], image_candidates, fraction_count(opts.vision_compute, n_images)
            )
            slot_rows.append(
                [torch.cat([sink, secondary, positions[kept_text[b, h]]]) for h in range(kv_heads)]
            )
            n_core.append(fraction_count(opts.vision_compute, n_images))
            core_positions.append(core)

        width = max(len(r) for rows in slot_rows for r in rows)
        position = torch.full((batch, kv_heads, width), -1, dtype=torch.long, device=query.device)
        for b, rows in enumerate(slot_rows):
            for h, r in enumerate(rows):
                position[b, h, : r.numel()] = r
        safe = position.clamp(min=0)
        kind = torch.full_like(position, EMPTY, dtype=torch.int8)
        is_image = image_mask.gather(1, safe.flatten(1)).view_as(position)
        kind[position >= 0] = TEXT
        kind[(position >= 0) & is_image] = IMAGE
        for b, first_image in enumerate(first_images):
            kind[b][(position[b] >= 0) & (position[b] < first_image)] = SINK
        core_mask = torch.zeros_like(position, dtype=torch.bool)
        for b, core in enumerate(core_positions):
            core_mask[b] = torch.isin(position[b], core) & (kind[b] == IMAGE)
        text_score = text_scores.gather(2, safe).masked_fill(kind != TEXT, 0.0)
        state = LayerCacheState(
            position=position,
            kind=kind,
            core=core_mask,
            text_score=text_score,
            n_text=n_text,
            n_core=n_core,
            next_position=k_len,
        )
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
        batch, q_heads = query.shape[:2]
        kv_heads = past_keys.shape[1]
        group = q_heads // kv_heads
        keys = torch.cat([past_keys, new_keys], dim=-2)
        values = torch.cat([past_values, new_values], dim=-2)
        self._append_token(state, batch, kv_heads, query.device)
        state.step += 1
        refresh = is_refresh_step(state.step, opts.refresh_every)

        # every kv head of a row has the same slot layout (equal counts per part); only which
        # text token sits in a text slot differs, so spans of slots are shared by the heads
        kind = state.kind[:, 0]
        if not torch.equal(state.kind, kind.unsqueeze(1).expand_as(state.kind)):
            raise RuntimeError("avl: the kv heads of a layer disagree on the cache layout")
        image_rows = (state.kind[:, :1] == IMAGE) & (state.core[:, :1] | refresh)
        text_rows = (state.kind == SINK) | (state.kind == TEXT)
        image_index = mask_to_index(image_rows)  # [B, 1, n], shared by the heads
        text_index = mask_to_index(text_rows)  # [B, Hkv, m], per kv head
        # sink and text (and, at a refresh, the whole secondary set) are contiguous spans;
        # the core image rows are an index list
        span_rows = (kind == SINK) | (kind == TEXT)
        if refresh:
            span_rows = span_rows | (kind == IMAGE)
        gathered = None if refresh or image_index.shape[-1] == 0 else image_index
        output, lse = attend_selected_rows(
            query, keys, values, gathered, scale, mask_to_ranges(span_rows)
        )
        attended = span_rows.sum(-1)
        if gathered is not None:
            attended = attended + (gathered[:, 0] >= 0).sum(-1)
        state.attended_rows = float(attended.float().mean())

        acc = state.text_score.dtype
        text_probs = _index_probs(query, keys, text_index, lse, scale, acc)  # [B, Hq, m]
        text_probs = text_probs.view(batch, kv_heads, group, -1).sum(dim=2)
        state.text_score.scatter_add_(
            2, text_index.clamp(min=0), text_probs.masked_fill(text_index < 0, 0.0)
        )
        state.text_score.masked_fill_(state.kind != TEXT, 0.0)
        if refresh and opts.refresh_every != -1:
            image_probs = _index_probs(query, keys, image_index, lse, scale, acc).mean(dim=1)
            self._choose_core(state, image_index[:, 0], image_probs)

        keep = self._text_keep_mask(state)
        if keep is not None:
            keys, values = self._compact(state, keep, keys, values)
        return output, keys, values

    @staticmethod
    def _append_token(state: LayerCacheState, batch: int, kv_heads: int, device) -> None:
        shape = (batch, kv_heads, 1)
        state.position = torch.cat(
            [state.position, torch.full(shape, state.next_position, device=device)], dim=-1
        )
        state.kind = torch.cat(
            [state.kind, torch.full(shape, TEXT, dtype=torch.int8, device=device)], dim=-1
        )
        state.core = torch.cat(
            [state.core, torch.zeros(shape, dtype=torch.bool, device=device)], -1
        )
        state.text_score = torch.cat([state.text_score, state.text_score.new_zeros(shape)], -1)
        state.n_text = [n + 1 for n in state.n_text]
        state.next_position += 1

    @staticmethod
    def _choose_core(state: LayerCacheState, image_index: Tensor, image_probs: Tensor) -> None:
        core = torch.zeros_like(state.core[:, 0])
        for b, count in enumerate(state.n_core):
            rows = image_index[b][image_index[b] >= 0]
            if count > 0 and rows.numel():
                best = torch.topk(image_probs[b, : rows.numel()], min(count, rows.numel())).indices
                core[b, rows[best]] = True
        state.core = core.unsqueeze(1).expand_as(state.core).clone()

    def _text_keep_mask(self, state: LayerCacheState) -> Tensor | None:
        """Slots to keep [B, Hkv, L] after the H2O text budget, or None if nothing is evicted."""
        text = state.kind == TEXT
        kept_text = h2o_text_keep(text, state.text_score, state.n_text, self.options)
        if kept_text is None:
            return None
        return (state.kind != EMPTY) & (~text | kept_text)

    @staticmethod
    def _compact(
        state: LayerCacheState, keep: Tensor, keys: Tensor, values: Tensor
    ) -> tuple[Tensor, Tensor]:
        width = int(keep.sum(-1).max())
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        still = keep.gather(-1, order)
        state.position = state.position.gather(-1, order).masked_fill(~still, -1)
        state.kind = state.kind.gather(-1, order).masked_fill(~still, EMPTY)
        state.core = state.core.gather(-1, order) & still
        state.text_score = state.text_score.gather(-1, order).masked_fill(~still, 0.0)
        return pick_rows(keys, order), pick_rows(values, order)


def _index_probs(
    query: Tensor, keys: Tensor, index: Tensor, lse: Tensor, scale: float, acc: torch.dtype
) -> Tensor:
    """Final softmax probabilities [B, Hq, n] of the selected rows (single query row)."""
    batch, q_heads = query.shape[:2]
    kv_heads = keys.shape[1]
    rows = index.expand(batch, kv_heads, -1)
    picked = pick_rows(keys, rows.clamp(min=0)).to(acc)
    grouped = query[:, :, -1].reshape(batch, kv_heads, q_heads // kv_heads, -1).to(acc)
    logits = torch.matmul(grouped, picked.transpose(-1, -2)) * scale  # [B, Hkv, g, n]
    probs = torch.exp(logits - lse[:, :, -1].reshape(batch, kv_heads, -1, 1).to(acc))
    probs = probs.masked_fill((rows < 0).unsqueeze(2), 0.0)
    return probs.reshape(batch, q_heads, -1)
