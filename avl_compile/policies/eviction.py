"""Baselines that evict KV rows and attend densely to the rows left (full cache, H2O,
StreamingLLM, FastV, random drop): one base class; each baseline says what it keeps.

Cache layout per (batch row, kv head): the kept slots in positional order, then empty slots
(rows of a batch may keep different counts); decode tokens are appended.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
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


@dataclasses.dataclass
class EvictionState:
    """Bookkeeping of one layer's cache; slots align with the cache's dim -2."""

    position: Tensor  # [B, Hkv, L] long, original position, -1 for an empty slot
    score: Tensor  # [B, Hkv, L] accumulated attention (zeros unless the policy tracks it)
    protected: Tensor  # [B, Hkv, L] bool, slots never evicted (StreamingLLM's sink)
    n_seen: list[int]  # tokens of each row seen so far, kept or evicted (padding excluded)
    next_position: int
    step: int = 0
    attended_rows: float = 0.0  # rows attended at the last decode step, mean over batch rows


def eviction_budget(kv_budget: float, n_seen: int) -> int:
    """Rows H2O and StreamingLLM keep: floor(kv_budget * current length), at least one."""
    return max(fraction_count(kv_budget, n_seen), 1)


class EvictionPolicy:
    """Dense attention over the kept rows; subclasses choose the rows."""

    tracks_scores = False  # accumulate each row's attention (H2O's heavy hitters)

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

    def decode_keep(self, state: EvictionState) -> Tensor | None:
        """[B, Hkv, L] slots to keep after a decode step, None to keep all."""
        return None

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
    ) -> tuple[Tensor, Tensor, Tensor, EvictionState]:
        batch, q_len = query.shape[0], query.shape[2]
        kv_heads, k_len = keys.shape[1], keys.shape[2]
        bias = prefill_logits_bias(attn_mask, is_causal, q_len, k_len, query.device)
        visible = self.visible_keys(context)
        output, bias = prefill_attention(
            query, keys, values, attn_mask, is_causal, scale, bias, visible
        )
        not_padding = key_is_valid(attn_mask, batch, k_len, query.device)
        key_valid = not_padding if visible is None else not_padding & visible
        shape = (batch, kv_heads, k_len)
        if self.tracks_scores:
            scores = column_sums(query, keys, bias, scale, key_valid[:, k_len - q_len :])
        else:
            scores = torch.zeros(shape, dtype=score_dtype(query.dtype), device=query.device)
        n_seen = not_padding.sum(-1).tolist()
        slots = key_valid[:, None, :].expand(shape)
        keep = self.prefill_keep(slots, scores, n_seen, context) & slots
        state = EvictionState(
            position=torch.arange(k_len, device=query.device).expand(shape),
            score=scores,
            protected=self.protected(key_valid)[:, None, :].expand(shape),
            n_seen=n_seen,
            next_position=k_len,
        )
        min_width = self.min_cache_width(not_padding, attn_mask)
        kept_keys, kept_values = self._compact(state, keep, keys, values, min_width)
        return output, kept_keys, kept_values, state

    def decode(
        self,
        query: Tensor,
        past_keys: Tensor,
        new_keys: Tensor,
        past_values: Tensor,
        new_values: Tensor,
        scale: float,
        state: EvictionState,
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch, q_heads = query.shape[:2]
        kv_heads = past_keys.shape[1]
        group = q_heads // kv_heads
        keys = torch.cat([past_keys, new_keys], dim=-2)
        values = torch.cat([past_values, new_values], dim=-2)
        self._append_token(state, query.device)
        valid = state.position >= 0
        if self.tracks_scores:
            output, probs = _attention_with_probs(query, keys, values, valid, scale)
            per_kv_head = probs.view(batch, kv_heads, group, -1).sum(dim=2)
            state.score += per_kv_head.to(state.score.dtype)
        else:
            mask = None if bool(valid.all()) else valid.repeat_interleave(group, 1)[:, :, None]
            output = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=scale, enable_gqa=group > 1
            )
        state.attended_rows = float(valid[:, 0].sum(-1).float().mean())
        keep = self.decode_keep(state)
        if keep is not None:
            keys, values = self._compact(state, keep & valid, keys, values)
        return output, keys, values

    @staticmethod
    def _append_token(state: EvictionState, device) -> None:
        batch, kv_heads = state.position.shape[:2]
        shape = (batch, kv_heads, 1)
        new_position = torch.full(shape, state.next_position, device=device)
        state.position = torch.cat([state.position, new_position], dim=-1)
        state.score = torch.cat([state.score, state.score.new_zeros(shape)], dim=-1)
        no = torch.zeros(shape, dtype=torch.bool, device=device)
        state.protected = torch.cat([state.protected, no], dim=-1)
        state.n_seen = [n + 1 for n in state.n_seen]
        state.next_position += 1
        state.step += 1

    @staticmethod
    def _compact(
        state: EvictionState, keep: Tensor, keys: Tensor, values: Tensor, min_width: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Move the kept slots to the front, in order; the rest become empty or go."""
        width = max(int(keep.sum(-1).max()), min_width)
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        still = keep.gather(-1, order)
        state.position = state.position.gather(-1, order).masked_fill(~still, -1)
        state.score = state.score.gather(-1, order).masked_fill(~still, 0.0)
        state.protected = state.protected.gather(-1, order) & still
        return pick_rows(keys, order), pick_rows(values, order)


def _attention_with_probs(
    query: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Decode attention that also returns its probabilities [B, Hq, L] (for H2O scores)."""
    batch, q_heads, _, head_dim = query.shape
    kv_heads = keys.shape[1]
    acc = score_dtype(query.dtype)
    grouped = query.reshape(batch, kv_heads, q_heads // kv_heads, head_dim).to(acc)
    logits = torch.matmul(grouped, keys.to(acc).transpose(-1, -2)) * scale
    probs = torch.softmax(logits.masked_fill(~valid[:, :, None, :], float("-inf")), dim=-1)
    output = torch.matmul(probs, values.to(acc)).reshape(batch, q_heads, 1, head_dim)
    return output.to(query.dtype), probs.reshape(batch, q_heads, -1)
