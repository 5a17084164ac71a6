"""Counting rules shared by the policy and the eager reference (shared/AVL_METHOD.md)."""

from __future__ import annotations


def fraction_count(fraction: float, total: int) -> int:
    """Floor of ``fraction * total``, computed as the authors do (``int(f * N)``)."""
    return int(fraction * total)


def text_budget(n_text: int, text_keep: float, min_budget: int) -> int:
    return max(round(text_keep * n_text), min_budget)


def split_text_budget(budget: int, heavy_share: float) -> tuple[int, int]:
    """(heavy hitters, most recent) shares of a text budget."""
    heavy = int(heavy_share * budget)
    return heavy, budget - heavy


def is_refresh_step(step: int, refresh_every: int) -> bool:
    """Decode step ``step`` (1-based; prefill is 0) attends the whole secondary set."""
    return refresh_every == -1 or step % refresh_every == 0
