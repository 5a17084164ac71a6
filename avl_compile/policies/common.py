"""Attention arithmetic shared by the KV policies: prefill scores, masks, index lists, and
the heavy-hitter + recent selection (H2O) used by A-VL's text side and by the H2O baseline."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from avl_compile.lowering.gathered_attention import score_dtype
from avl_compile.policies.budgets import best_first, fraction_count

_QUERY_CHUNK = 256  # query rows per block when summing prefill attention columns


@dataclasses.dataclass
class PrefillContext:
    """What the sites of one prefill forward share: the image mask and the prefill filter."""

    image_mask: Tensor  # [B, L] bool
    filter_keep: Tensor | None = None  # [B, L] bool, image tokens that pass the prefill filter
    used_by_layers: set[int] = dataclasses.field(default_factory=set)  # a layer seen twice = stale
    schedule: Any = None  # A-VL: the host-side decode schedule the prompt's layers share
    # A-VL: the prompt's layout (``avl_layout``) per prefill filter and image budgets
    layouts: dict[tuple, Any] = dataclasses.field(default_factory=dict)
    # where a layer's heads are split over ranks (tensor parallel): turns a mean over this
    # rank's heads into the mean over every head (equal head counts per rank); None: one rank
    combine_heads: Callable[[Tensor], Tensor] | None = None
    # whether every prompt of the batch holds an image token: read from the mask by the
    # first layer (a read of the device), not by every layer
    every_row_has_image: bool | None = None

    def rows_all_hold_images(self) -> bool:
        if self.every_row_has_image is None:
            self.every_row_has_image = bool(self.image_mask.any(dim=-1).all())
        return self.every_row_has_image


def prefill_logits_bias(
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


def key_is_valid(attn_mask: Tensor | None, batch: int, k_len: int, device) -> Tensor:
    """[B, Lk]: keys the last query row may attend, i.e. not left padding."""
    if attn_mask is None:
        return torch.ones(batch, k_len, dtype=torch.bool, device=device)
    last_row = attn_mask[:, 0, -1, :].expand(batch, k_len)
    if attn_mask.dtype == torch.bool:
        return last_row.clone()
    return last_row > torch.finfo(attn_mask.dtype).min / 2


def prefill_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    bias: Tensor,
    visible: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Prefill SDPA output, and the bias the scores use; ``visible`` [B, L] hides keys
    (the prefill filter) from every query row."""
    enable_gqa = query.shape[1] != keys.shape[1]
    if visible is None:
        output = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )  # fmt: skip
        return output, bias
    bias = bias.masked_fill(~visible[:, None, None, :], float("-inf"))
    output = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=bias.to(query.dtype), scale=scale, enable_gqa=enable_gqa
    )
    return output, bias


def softmax_rows(query: Tensor, keys: Tensor, bias: Tensor, scale: float, acc) -> Tensor:
    """Softmax rows [B, Hq, q, Lk] of ``query`` against all keys (GQA aware)."""
    group = query.shape[1] // keys.shape[1]
    expanded = keys.to(acc).repeat_interleave(group, dim=1)
    logits = torch.matmul(query.to(acc), expanded.transpose(-1, -2)) * scale
    return torch.softmax(logits + bias.to(acc), dim=-1).nan_to_num(0.0)


def window_sum(probs: Tensor, query_valid: Tensor | None, window: int) -> Tensor:
    """[B, H, Lk]: probabilities [B, H, window, Lk] of the last prompt rows summed over the
    valid rows (one row: itself, bit for bit)."""
    if window == 1:
        return probs[:, :, 0]
    weight = query_valid[:, None, -window:, None].to(probs.dtype)
    return (probs * weight).sum(dim=2)


def last_token_score(
    query: Tensor,
    keys: Tensor,
    bias: Tensor,
    scale: float,
    window: int = 1,
    query_valid: Tensor | None = None,
) -> Tensor:
    """[B, Lk]: the attention of the last ``window`` prompt tokens over the whole row,
    summed over the valid tokens, head-averaged (``window=1``: the last token's)."""
    acc = score_dtype(query.dtype)
    probs = softmax_rows(query[:, :, -window:, :], keys, bias[..., -window:, :], scale, acc)
    return window_sum(probs, query_valid, window).mean(dim=1)


def column_sums(
    query: Tensor, keys: Tensor, bias: Tensor, scale: float, query_valid: Tensor
) -> Tensor:
    """Accumulated attention per kv head [B, Hkv, Lk]: column sums over valid query rows,
    computed in blocks of query rows so the probabilities never exist all at once."""
    batch, q_heads, q_len, _ = query.shape
    kv_heads = keys.shape[1]
    acc = score_dtype(query.dtype)
    total = torch.zeros(batch, q_heads, keys.shape[2], dtype=acc, device=query.device)
    for start in range(0, q_len, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, q_len)
        probs = softmax_rows(query[:, :, start:stop], keys, bias[..., start:stop, :], scale, acc)
        weight = query_valid[:, None, start:stop, None].to(acc)
        total += (probs * weight).sum(dim=2)
    return total.view(batch, kv_heads, q_heads // kv_heads, -1).sum(dim=2)


def last_token_image_filter(
    query: Tensor,
    keys: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    image_mask: Tensor,
    keep_fraction: float,
) -> Tensor:
    """Image tokens [B, L] that pass a FastV-style filter: the floor(keep_fraction * N) best
    by this layer's last-token, head-averaged attention."""
    batch, q_len, k_len = query.shape[0], query.shape[2], keys.shape[2]
    bias = prefill_logits_bias(attn_mask, is_causal, q_len, k_len, query.device)
    score = last_token_score(query, keys, bias, scale)
    keep = torch.zeros_like(image_mask)
    for b in range(batch):
        image_pos = torch.nonzero(image_mask[b]).flatten()
        count = fraction_count(keep_fraction, image_pos.numel())
        keep[b, topk_positions(score[b], image_pos, count)] = True
    return keep


def topk_positions(scores: Tensor, candidates: Tensor, k: int) -> Tensor:
    """Positions (sorted) of the k largest ``scores`` among the ``candidates`` positions
    (ascending); ties go to the lower position."""
    if k <= 0 or candidates.numel() == 0:
        return candidates[:0]
    best = best_first(scores[candidates], candidates)[:k]  # the one tie rule
    return candidates[best].sort().values


def heavy_recent_keep(
    slots: Tensor, scores: Tensor, budgets: list[int], heavy_share: float
) -> Tensor | None:
    """The slots to keep [B, Hkv, L] under per-row budgets, or None if every row fits.

    ``slots`` [B, Hkv, L] marks the candidates, in positional order along L (the same count
    in every head of a row). Per (row, kv head) the int(heavy_share * budget) heaviest older
    ones by accumulated attention ``scores`` are kept, and the most recent ones fill the rest
    of the budget: H2O. Vectorised; the score-free half (``recent_split``) can be made once
    for slots that several layers share."""
    split = recent_split(slots, budgets, heavy_share)
    return None if split is None else keep_heavy(slots, scores, split)


@dataclasses.dataclass
class RecentSplit:
    """The half of H2O's keep that needs no score: per row whether it is over its budget,
    the slots its recent share keeps, the older ones that compete as heavy hitters."""

    over: Tensor  # [B, 1, 1] bool
    recent: Tensor  # [B, Hkv, L] bool
    not_older: Tensor  # [B, Hkv, L] bool: not an older candidate
    n_heavy: Tensor  # [B, 1, 1] heavy hitters kept
    most: int  # the largest of them


def recent_split(slots: Tensor, budgets: list[int], heavy_share: float) -> RecentSplit | None:
    """``heavy_recent_keep``'s score-free half; None if every row fits its budget."""
    kept_count = slots[:, 0].sum(-1).tolist()
    over = [int(c) > b for c, b in zip(kept_count, budgets, strict=True)]
    if not any(over):
        return None
    device = slots.device
    heavy_counts = [int(heavy_share * b) for b in budgets]
    n_heavy = torch.tensor(heavy_counts, device=device).view(-1, 1, 1)
    n_recent = torch.tensor(
        [b - h for b, h in zip(budgets, heavy_counts, strict=True)], device=device
    ).view(-1, 1, 1)
    from_end = slots.flip(-1).cumsum(-1).flip(-1)  # 1 for the newest slot
    recent = slots & (from_end <= n_recent)
    over_rows = torch.tensor(over, device=device).view(-1, 1, 1)
    return RecentSplit(over_rows, recent, ~slots | recent, n_heavy, max(heavy_counts))


def keep_heavy(slots: Tensor, scores: Tensor, split: RecentSplit) -> Tensor:
    """``heavy_recent_keep`` given its ``recent_split``: the recent slots and the heaviest
    older ones by ``scores`` [B, Hkv, L]; rows within their budget keep every slot."""
    heavy = torch.zeros_like(slots)
    if split.most > 0:
        masked = scores.masked_fill(split.not_older, float("-inf"))
        # stable: among equal scores the lower position is the heavier (the one tie rule)
        top = torch.sort(masked, dim=-1, descending=True, stable=True)
        values, indices = top.values[..., : split.most], top.indices[..., : split.most]
        rank = torch.arange(indices.shape[-1], device=slots.device)
        heavy.scatter_(-1, indices, (rank < split.n_heavy) & torch.isfinite(values))
    return torch.where(split.over, split.recent | heavy, slots)
