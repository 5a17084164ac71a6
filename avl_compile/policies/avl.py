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
import torch.nn.functional as F
from torch import Tensor

from avl_compile.lowering import attend_selected_rows
from avl_compile.lowering.gathered_attention import pick_rows
from avl_compile.options import AvlOptions
from avl_compile.policies.budgets import (
    fraction_count,
    is_refresh_step,
    split_text_budget,
    text_budget,
)

EMPTY, SINK, IMAGE, TEXT = 0, 1, 2, 3
_QUERY_CHUNK = 256  # query rows per block when summing prefill attention columns


@dataclasses.dataclass
class PrefillContext:
    """What the sites of one prefill forward share: the image mask and the prefill filter."""

    image_mask: Tensor  # [B, L] bool
    filter_keep: Tensor | None = None  # [B, L] bool, image tokens that pass the prefill filter
    used_by_layers: set[int] = dataclasses.field(default_factory=set)  # a layer seen twice = stale


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


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prefill_logits_bias(
    attn_mask: Tensor | None, is_causal: bool, q_len: int, k_len: int, device: torch.device
) -> Tensor:
    """Additive bias [B or 1, 1, Lq, Lk] equal to what SDPA applies for these arguments."""
    bias = torch.zeros(1, 1, q_len, k_len, device=device, dtype=torch.float64)
    if is_causal:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        bias = bias.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        else:
            bias = bias + attn_mask.to(torch.float64)
    return bias


def _key_is_valid(attn_mask: Tensor | None, batch: int, k_len: int, device) -> Tensor:
    """[B, Lk]: keys the last query row may attend, i.e. not left padding."""
    if attn_mask is None:
        return torch.ones(batch, k_len, dtype=torch.bool, device=device)
    last_row = attn_mask[:, 0, -1, :].expand(batch, k_len)
    if attn_mask.dtype == torch.bool:
        return last_row.clone()
    return last_row > torch.finfo(attn_mask.dtype).min / 2


def _mask_to_index(mask: Tensor) -> Tensor:
    """Bool [..., L] -> int64 [..., n] of the True positions in order, padded with -1."""
    length = mask.shape[-1]
    count = int(mask.sum(-1).max()) if mask.numel() else 0
    order = torch.where(mask, torch.arange(length, device=mask.device), length)
    index = order.sort(dim=-1).values[..., :count]
    return index.masked_fill(index == length, -1)


def _mask_to_ranges(mask: Tensor) -> Tensor:
    """Bool [B, L] -> int64 [B, R, 2] of its runs of True as (start, stop), (0, 0) padded."""
    previous = F.pad(mask[:, :-1], (1, 0), value=False)
    following = F.pad(mask[:, 1:], (0, 1), value=False)
    starts = _mask_to_index(mask & ~previous)
    stops = _mask_to_index(mask & ~following) + 1
    return torch.stack([starts.clamp(min=0), stops], dim=-1)  # padding: (0, 0)


def _topk_positions(scores: Tensor, candidates: Tensor, k: int) -> Tensor:
    """Positions (sorted) of the k largest ``scores`` among the ``candidates`` positions."""
    if k <= 0 or candidates.numel() == 0:
        return candidates[:0]
    k = min(k, candidates.numel())
    best = torch.topk(scores[candidates], k).indices
    return candidates[best].sort().values


def h2o_text_keep(
    text: Tensor, scores: Tensor, n_text: list[int], options: AvlOptions
) -> Tensor | None:
    """The text slots to keep [B, Hkv, L] under the H2O budget, or None if all fit.

    ``text`` [B, Hkv, L] marks text slots, in positional order along L; per (row, kv head)
    the most recent ones are kept, plus the heaviest older ones by accumulated attention
    ``scores``. The budget of row b is text_budget(n_text[b]). Vectorised: it runs at
    prefill and at every decode step of every layer."""
    budgets = [text_budget(n, options.text_keep, options.text_min_budget) for n in n_text]
    kept_count = text[:, 0].sum(-1).tolist()  # equal across the heads of a row
    over = [int(c) > b for c, b in zip(kept_count, budgets, strict=True)]
    if not any(over):
        return None
    shares = [split_text_budget(b, options.text_heavy_share) for b in budgets]
    device = text.device
    n_heavy = torch.tensor([h for h, _ in shares], device=device).view(-1, 1, 1)
    n_recent = torch.tensor([r for _, r in shares], device=device).view(-1, 1, 1)
    from_end = text.flip(-1).cumsum(-1).flip(-1)  # 1 for the newest text slot
    recent = text & (from_end <= n_recent)
    older = text & ~recent
    heavy = torch.zeros_like(text)
    most = int(n_heavy.max())
    if most > 0:
        masked = scores.masked_fill(~older, float("-inf"))
        top = torch.topk(masked, min(most, masked.shape[-1]), dim=-1)
        rank = torch.arange(top.indices.shape[-1], device=device)
        heavy.scatter_(-1, top.indices, (rank < n_heavy) & torch.isfinite(top.values))
    over_rows = torch.tensor(over, device=device).view(-1, 1, 1)
    return torch.where(over_rows, recent | heavy, text)


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
        batch, q_heads, q_len, head_dim = query.shape
        kv_heads, k_len = keys.shape[1], keys.shape[2]
        group = q_heads // kv_heads
        bias = _prefill_logits_bias(attn_mask, is_causal, q_len, k_len, query.device)
        filtered = self._filtered_keys(context)
        if filtered is not None:
            bias = bias.masked_fill(~filtered[:, None, None, :], float("-inf"))
            output = F.scaled_dot_product_attention(
                query,
                keys,
                values,
                attn_mask=bias.to(query.dtype),
                scale=scale,
                enable_gqa=group > 1,
            )
        else:
            output = F.scaled_dot_product_attention(
                query,
                keys,
                values,
                attn_mask=attn_mask,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=group > 1,
            )

        acc = _score_dtype(query.dtype)
        key_valid = _key_is_valid(attn_mask, batch, k_len, query.device)
        if filtered is not None:
            key_valid = key_valid & filtered
        image_score = self._last_token_score(query, keys, bias, scale)
        query_valid = key_valid[:, k_len - q_len :]
        column_sums = self._column_sums(query, keys, bias, scale, acc, query_valid)

        image_mask = context.image_mask
        positions = torch.arange(k_len, device=query.device)
        first_image_pos = image_mask.int().argmax(dim=-1, keepdim=True)  # [B, 1]
        text_mask = key_valid & ~image_mask & (positions >= first_image_pos)  # [B, Lk]
        n_text = text_mask.sum(-1).tolist()
        text_slots = text_mask[:, None, :].expand(batch, kv_heads, k_len)
        kept_text = h2o_text_keep(text_slots, column_sums, n_text, opts)
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
            secondary = _topk_positions(
                image_score[b], image_candidates, fraction_count(opts.vision_keep, n_images)
            )
            core = _topk_positions(
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
        text_score = column_sums.gather(2, safe).masked_fill(kind != TEXT, 0.0)
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

    def choose_prefill_filter(
        self,
        query: Tensor,
        keys: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        scale: float,
        context: PrefillContext,
    ) -> Tensor:
        """Image tokens [B, L] that pass the FastV-style filter, by this layer's last-row score."""
        batch, q_len, k_len = query.shape[0], query.shape[2], keys.shape[2]
        bias = _prefill_logits_bias(attn_mask, is_causal, q_len, k_len, query.device)
        score = self._last_token_score(query, keys, bias, scale)
        keep = torch.zeros_like(context.image_mask)
        for b in range(batch):
            image_pos = torch.nonzero(context.image_mask[b]).flatten()
            count = fraction_count(self.options.prefill_filter_keep, image_pos.numel())
            keep[b, _topk_positions(score[b], image_pos, count)] = True
        return keep

    @classmethod
    def _last_token_score(cls, query: Tensor, keys: Tensor, bias: Tensor, scale: float) -> Tensor:
        """[B, Lk]: the last prompt token's attention over the whole row, head-averaged."""
        acc = _score_dtype(query.dtype)
        probs = cls._probs(query[:, :, -1:, :], keys, bias[..., -1:, :], scale, acc)
        return probs[:, :, 0, :].mean(dim=1)

    @staticmethod
    def _probs(query: Tensor, keys: Tensor, bias: Tensor, scale: float, acc: torch.dtype) -> Tensor:
        """Softmax rows [B, Hq, q, Lk] of ``query`` against all keys (GQA aware)."""
        group = query.shape[1] // keys.shape[1]
        expanded = keys.to(acc).repeat_interleave(group, dim=1)
        logits = torch.matmul(query.to(acc), expanded.transpose(-1, -2)) * scale
        return torch.softmax(logits + bias.to(acc), dim=-1).nan_to_num(0.0)

    def _column_sums(
        self,
        query: Tensor,
        keys: Tensor,
        bias: Tensor,
        scale: float,
        acc: torch.dtype,
        query_valid: Tensor,
    ) -> Tensor:
        """Accumulated attention per kv head [B, Hkv, Lk]: column sums over valid query rows."""
        batch, q_heads, q_len, _ = query.shape
        kv_heads = keys.shape[1]
        total = torch.zeros(batch, q_heads, keys.shape[2], dtype=acc, device=query.device)
        for start in range(0, q_len, _QUERY_CHUNK):
            stop = min(start + _QUERY_CHUNK, q_len)
            probs = self._probs(query[:, :, start:stop], keys, bias[..., start:stop, :], scale, acc)
            weight = query_valid[:, None, start:stop, None].to(acc)
            total += (probs * weight).sum(dim=2)
        return total.view(batch, kv_heads, q_heads // kv_heads, -1).sum(dim=2)

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
        image_index = _mask_to_index(image_rows)  # [B, 1, n], shared by the heads
        text_index = _mask_to_index(text_rows)  # [B, Hkv, m], per kv head
        # sink and text (and, at a refresh, the whole secondary set) are contiguous spans;
        # the core image rows are an index list
        span_rows = (kind == SINK) | (kind == TEXT)
        if refresh:
            span_rows = span_rows | (kind == IMAGE)
        gathered = None if refresh or image_index.shape[-1] == 0 else image_index
        output, lse = attend_selected_rows(
            query, keys, values, gathered, scale, _mask_to_ranges(span_rows)
        )

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
