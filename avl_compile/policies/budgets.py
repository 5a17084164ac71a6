"""Counting rules shared by the policy and the eager reference (shared/AVL_METHOD.md)."""

from __future__ import annotations

import torch
from torch import Tensor


def fraction_count(fraction: float, total: int) -> int:
    """Floor of ``fraction * total``, computed as the authors do (``int(f * N)``)."""
    return int(fraction * total)


def sloped_layer_budgets(mean: float, num_layers: int, slope: float) -> tuple[float, ...]:
    """Per-layer image budgets (``vision_keep_layers``) falling linearly from
    ``mean * (1 + slope)`` in the first layer to ``mean * (1 - slope)`` in the last, so
    that their mean is ``mean`` (PyramidKV's shape: early layers attend more widely)."""
    if not 0 <= slope < 1:
        raise ValueError(f"slope={slope!r} is invalid; it must be in [0, 1)")
    if not 0 < mean * (1 + slope) <= 1:
        raise ValueError(
            f"mean={mean!r} with slope={slope!r} gives the first layer {mean * (1 + slope):.3g}; "
            "it must be a fraction in (0, 1]"
        )
    if num_layers == 1:
        return (mean,)
    return tuple(
        mean * (1 + slope * (1 - 2 * layer / (num_layers - 1))) for layer in range(num_layers)
    )


def text_budget(n_text: int, text_keep: float, min_budget: int) -> int:
    return max(round(text_keep * n_text), min_budget)


def split_text_budget(budget: int, heavy_share: float) -> tuple[int, int]:
    """(heavy hitters, most recent) shares of a text budget."""
    heavy = int(heavy_share * budget)
    return heavy, budget - heavy


def is_refresh_step(step: int, refresh_every: int) -> bool:
    """Decode step ``step`` (1-based; prefill is 0) attends the whole secondary set."""
    return refresh_every == -1 or step % refresh_every == 0


_POSITION_SPAN = 1 << 40  # more than any position (or -1), so it orders before position


def best_first(scores: Tensor, positions: Tensor, prefer: Tensor | None = None) -> Tensor:
    """Order (indices along the last dim) of candidates, best first, under the one tie rule
    every selection of the policy and the reference follows: higher score first; among
    equal scores, the ``prefer`` ones first (rows already in the core, at a re-pick); then
    the lower position. Fixed shapes, no host sync. Non-negative float32 scores (or -inf)
    sort once, on one int64 key (any sign, and -inf); other dtypes take two stable sorts.
    Scores computed in float32 should come here as float32: a float64 copy of them orders
    the same, in two sorts."""
    if scores.dtype == torch.float32:
        return torch.sort(_rule_key(scores, positions, prefer), dim=-1, descending=True).indices
    if prefer is not None:  # preferred first, then the lower position: one sort
        positions = torch.where(prefer, positions, positions + _POSITION_SPAN)
    order = torch.sort(positions, dim=-1, stable=True).indices
    ranked = scores.gather(-1, order)
    return order.gather(-1, torch.sort(ranked, dim=-1, descending=True, stable=True).indices)


def last_ranked(scores: Tensor, positions: Tensor, count: int) -> Tensor:
    """Indices [..., count] of the ``count`` candidates the tie rule (``best_first``) ranks
    last, the last first. Float32 scores take one top-k of the rule's key (a selection of
    ``count``: about half a sort's time for 64 of 394, 1 thread); others ``best_first``."""
    if scores.dtype == torch.float32:
        key = _rule_key(scores, positions, None)
        return torch.topk(key, count, dim=-1, largest=False, sorted=True).indices
    return best_first(scores, positions).flip(-1)[..., :count]


def lightest(scores: Tensor, candidates: Tensor, positions: Tensor) -> Tensor:
    """Index (along the last dim) of the candidate an H2O eviction drops: the one ranked last
    by the tie rule, i.e. the least score, and among equal scores the higher position."""
    masked = scores.masked_fill(~candidates, float("inf"))
    least = candidates & (masked == masked.amin(dim=-1, keepdim=True))
    return positions.masked_fill(~least, -1).argmax(dim=-1)


def _rule_key(scores: Tensor, positions: Tensor, prefer: Tensor | None) -> Tensor:
    """One int64 per candidate that orders as the tie rule does: the float32 score as an
    int32 that orders as the floats do (a float's bits, with a negative float's other 31
    bits flipped; -0.0 made +0.0 first, as the floats tie), the preference bit, then the
    position reversed (positions are below 2**31)."""
    bits = (scores + 0.0).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = ordered.to(torch.int64) * 2**32
    if prefer is not None:
        key = key + prefer.to(torch.int64) * 2**31
    return key + (2**31 - 1 - positions.to(torch.int64))
