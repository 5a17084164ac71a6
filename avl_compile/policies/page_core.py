"""The query-aware core (A-VL's option ``core_page_size``): at every decode step the core is
chosen from the step's own query instead of being re-picked every K steps.

The prompt's image tokens fall into pages of ``core_page_size`` consecutive image tokens.
A page's digest, per kv head, is the element-wise min and max of the keys of its rows that
are still in the cache (the secondary set); the largest q.k a key inside that box can give,
summed over the head dimension and averaged over the query heads (as A-VL's score), bounds
the page's attention from above (Quest's bound). Every secondary row scores its page's bound;
the best ``n_core`` rows are the step's core (the one tie rule: rows already in the core
stay, then the lower position), so a step attends sink + core + text and never the whole
secondary set. Fixed shapes and no host sync: the score is one tensor function.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from avl_compile.lowering.slot_attention import score_dtype


def digest_bound(query: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """The largest q.k a key inside the box [``low``, ``high``] can give, per query head
    (the head dimension summed; broadcasting shapes)."""
    return torch.maximum(query * low, query * high).sum(-1)


def page_bound_per_slot(
    query: Tensor,
    keys: Tensor,
    candidate: Tensor,
    bucket: Tensor,
    page_size: int,
    n_buckets: int | None = None,
) -> Tensor:
    """For every ``candidate`` slot [B, C] (bool), the digest bound of its page given
    ``query`` [B, Hq, D]; -inf elsewhere. ``keys`` [B, Hkv, C, D]; ``bucket`` [B, C] the
    slot's page as an index below ``n_buckets`` (default C; slots of one page share it;
    ``page_buckets``); a page holds at most ``page_size`` slots. Returns [B, C] in the
    accumulation dtype (float32, or float64 for float64 queries)."""
    batch, q_heads, head_dim = query.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    n_buckets = capacity if n_buckets is None else min(n_buckets, capacity)
    acc = score_dtype(query.dtype)
    members, held = page_members(torch.where(candidate, bucket, capacity), page_size, n_buckets)
    # each page's keys side by side, then its box: a gather and a reduction Inductor fuses
    # (a scatter_reduce by bucket is an eager kernel 13x slower here)
    index = members.view(batch, 1, -1, 1).expand(-1, kv_heads, -1, head_dim)
    shape = (batch, kv_heads, n_buckets, page_size, head_dim)
    paged = keys.gather(2, index).view(shape).to(acc)
    held = held[:, None, :, :, None]
    low = paged.masked_fill(~held, math.inf).amin(dim=3)  # [B, Hkv, n_buckets, D]
    high = paged.masked_fill(~held, -math.inf).amax(dim=3)
    q = query.reshape(batch, kv_heads, q_heads // kv_heads, 1, head_dim).to(acc)
    bound = digest_bound(q, low[:, :, None], high[:, :, None])  # [B, Hkv, G, n_buckets]
    bound = bound.reshape(batch, q_heads, n_buckets).mean(dim=1)
    # empty buckets hold inf/nan, but no candidate reads them
    score = bound.gather(1, bucket.clamp(min=0, max=n_buckets - 1))
    return score.masked_fill(~candidate, -math.inf)  # float32-born: one sort (best_first)


def page_members(
    bucket: Tensor, page_size: int, n_buckets: int | None = None
) -> tuple[Tensor, Tensor]:
    """The slots of every bucket below ``n_buckets`` (default C) of ``bucket`` [B, C] (C:
    in no page), at most ``page_size`` each, in slot order: [B, n_buckets, page_size] slot
    indices and whether each is one (fixed shapes: a stable sort by bucket, then each
    bucket's run)."""
    batch, capacity = bucket.shape
    n_buckets = capacity if n_buckets is None else n_buckets
    by_bucket, order = torch.sort(bucket, dim=1, stable=True)
    buckets = torch.arange(n_buckets + 1, device=bucket.device).expand(batch, -1).contiguous()
    start = torch.searchsorted(by_bucket.contiguous(), buckets)  # each run's start
    index = start[:, :n_buckets, None] + torch.arange(page_size, device=bucket.device)
    held = index < start[:, 1:, None]
    members = order.gather(1, index.clamp(max=capacity - 1).view(batch, -1))
    return members.view(batch, n_buckets, page_size), held


def pages_of(image_tokens: int, page_size: int) -> int:
    """Pages of ``page_size`` of a prompt of ``image_tokens``: the most page buckets any
    slot can hold (``page_buckets`` ranks the pages present)."""
    return -(-image_tokens // page_size)


def page_buckets(
    positions: Tensor, image: Tensor, image_positions: Tensor, page_size: int
) -> Tensor:
    """The page bucket [B, C] of every slot flagged ``image`` [B, C] (-1 elsewhere): the
    rank of its page (image token index // ``page_size``, from the row's ascending
    ``image_positions`` [B, N]) among the pages present in the row, so below C. Fixed
    shapes, no host read (prefill, a recall swap)."""
    ordinal = torch.searchsorted(image_positions.contiguous(), positions.contiguous())
    n_pages = -(-image_positions.shape[1] // page_size)
    page = torch.where(image, ordinal // page_size, n_pages)  # n_pages: in no page
    present = torch.zeros(page.shape[0], n_pages + 1, dtype=torch.long, device=page.device)
    present.scatter_(1, page, 1)
    rank = present[:, :n_pages].cumsum(1) - 1  # [B, n_pages]: among the pages present
    return torch.where(image, rank.gather(1, page.clamp(max=n_pages - 1)), -1)
