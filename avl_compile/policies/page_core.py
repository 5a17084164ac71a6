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


def page_bound_per_slot(
    query: Tensor,
    keys: Tensor,
    candidate: Tensor,
    positions: Tensor,
    image_positions: Tensor,
    page_size: int,
) -> Tensor:
    """For every ``candidate`` slot [B, C] (bool), the digest bound of its page given
    ``query`` [B, Hq, D]; -inf elsewhere. ``keys`` [B, Hkv, C, D]; ``positions`` [B, C] the
    slots' token positions; ``image_positions`` [B, N] each row's image positions, ascending
    (padded at the end with larger values). Returns float64 [B, C]."""
    batch, q_heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    n_pages = math.ceil(image_positions.shape[1] / page_size)
    ordinal = torch.searchsorted(image_positions.contiguous(), positions.contiguous())
    page = torch.where(candidate, ordinal // page_size, n_pages)  # n_pages: not in a page
    acc = score_dtype(query.dtype)
    k = keys.to(acc)
    index = page[:, None, :, None].expand(k.shape)
    shape = (batch, kv_heads, n_pages + 1, head_dim)
    low = k.new_full(shape, math.inf).scatter_reduce(2, index, k, "amin")
    high = k.new_full(shape, -math.inf).scatter_reduce(2, index, k, "amax")
    q = query.reshape(batch, kv_heads, q_heads // kv_heads, 1, head_dim).to(acc)
    bound = torch.maximum(q * low[:, :, None], q * high[:, :, None]).sum(-1)  # [B, Hkv, G, P]
    bound = bound.reshape(batch, q_heads, n_pages + 1).mean(dim=1)
    # empty pages hold inf/nan, but no candidate reads them
    score = bound.gather(1, page).to(torch.float64)
    return score.masked_fill(~candidate, -math.inf)
