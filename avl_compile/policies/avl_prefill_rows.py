"""Which prompt rows one layer keeps at prefill, as one pure tensor function of fixed shapes.

Given the layer's scores and its prompt's layout (``avl_layout``), the rows each slot holds,
their keys and values, and the decode state the slots start with. Every count comes from
the layout (not from the scores), so every shape is known before the scores are: no
``nonzero``, no boolean indexing. On a host-bound model the same ~150 small ops per layer
as separate eager calls were most of the prefill's extra time over dense attention; with
fixed shapes Inductor can compile the whole function once and run it as a few fused
kernels per layer (``compiled_prefill_rows``). Eager and compiled run this same code.
On a CPU (float32, no prefill filter) the prefill takes the C twin of the whole function
instead (``native_selection``: ``lowering/prefill_rows.c``), which the tests hold to this
function's rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from avl_compile.lowering import native_prefill_rows
from avl_compile.lowering.gathered_attention import pick_rows, score_dtype
from avl_compile.lowering.slot_attention import slot_logits
from avl_compile.options import AvlOptions
from avl_compile.policies.avl_layout import PromptLayout
from avl_compile.policies.budgets import best_first
from avl_compile.policies.common import keep_heavy
from avl_compile.policies.page_core import core_page_tensors, image_ordinals, pages_of
from avl_compile.policies.recall import page_tensors


class RowPlan(NamedTuple):
    """The options the selection reads (hashable: a compiled selection specializes on it)."""

    recall_page_size: int  # 0: recall off (no evicted pages)
    core_page_size: int  # 0: the query-aware core off

    @classmethod
    def of(cls, options: AvlOptions) -> RowPlan:
        recall = options.recall_page_size if options.recall_pages else 0
        return cls(recall_page_size=recall, core_page_size=options.core_page_size)


class PrefillRows(NamedTuple):
    """One layer's kept rows and the decode state they start."""

    position: Tensor  # [B, Hkv, C] prompt position per slot, -1: free
    slot_keys: Tensor  # [B, Hkv, C, D]
    slot_values: Tensor
    text_rank: Tensor  # [B, Hkv, C]
    text_score: Tensor  # [B, Hkv, C]
    last_qk: Tensor | None  # [B, C] the last prompt token's q.k per slot (recall)
    image_ordinal: Tensor | None  # [B, C] (the query-aware core)
    core_pages: tuple[Tensor, Tensor, Tensor] | None  # low, high, members (``CorePages``)
    # positions, keys, values, low, high of the evicted rows' pages (recall)
    recall_pages: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None
    # the decode state's own copies, where the selection made them (the C op); else None
    # and the policy copies the layout's
    state_copies: StateCopies | None = None


class StateCopies(NamedTuple):
    """A layer's copies of its prompt layout's tensors, and of the last query row."""

    role: Tensor  # [B, C] int8
    counters: Tensor  # [B, 5] int64
    text_options: Tensor  # [3] float64
    last_query: Tensor  # [B, Hq, D] contiguous

    @classmethod
    def of(cls, layout: PromptLayout, query: Tensor) -> StateCopies:
        """The copies made in Python (the C op makes the same in C++). The last query row
        is a copy of its own: at batch 1 it is a contiguous view, and a view would keep
        the prompt's whole query alive."""
        return cls(
            layout.role.clone(), layout.counters.clone(), layout.text_options.clone(),
            query[:, :, -1].clone(memory_format=torch.contiguous_format),
        )  # fmt: skip


def marked(positions: Tensor, length: int) -> Tensor:
    """[length] bool, True at ``positions`` (a membership test without ``isin``'s sorts)."""
    return torch.zeros(length, dtype=torch.bool, device=positions.device).index_fill_(
        0, positions, True
    )


def without(positions: Tensor, leaving: Tensor, length: int) -> Tensor:
    """``positions`` (ascending, < ``length``) less ``leaving`` (a subset of them), still
    ascending: a fixed count, unlike a boolean index."""
    gone = marked(leaving, length)[positions]
    kept = positions.numel() - leaving.numel()
    return torch.where(gone, length, positions).sort().values[:kept]


def ranked_groups(
    scores: Tensor, candidates: Tensor, n_core: int, n_secondary: int, length: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``candidates`` positions (ascending, < ``length``) split by their rank under the
    tie rule (``best_first``) of ``scores`` [length]: the core (the ``n_core`` best), the
    other secondary rows (the next ``n_secondary - n_core``) and the rest, each ascending.
    One ranking and one sort of group-major keys: the core is the best of the secondary
    set, so the best of the candidates (as two top-k's of the rule would choose)."""
    order = best_first(scores[candidates], candidates)
    ordinal = torch.arange(candidates.numel(), device=candidates.device)
    rank = torch.empty_like(order).scatter_(0, order, ordinal)
    group = (rank >= n_core).long() + (rank >= n_secondary).long()  # core, others, the rest
    grouped = (group * length + candidates).sort().values % length
    return grouped[:n_core], grouped[n_core:n_secondary], grouped[n_secondary:]


def first_marked(mask: Tensor, count: int) -> Tensor:
    """The first ``count`` True positions of every row of ``mask`` [H, L] (each holds
    exactly ``count``): ``nonzero``'s columns in a fixed shape."""
    length = mask.shape[-1]
    columns = torch.arange(length, device=mask.device).expand_as(mask)
    return torch.where(mask, columns, length).sort(dim=-1).values[:, :count]


def prefill_rows(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    image_score: Tensor,
    text_scores: Tensor,
    scale: float,
    layout: PromptLayout,
    plan: RowPlan,
) -> PrefillRows:
    """The rows a layer keeps under ``layout``, from its scores: ``image_score`` [B, Lk]
    (the last tokens' attention, head-averaged) and ``text_scores`` [B, Hkv, Lk] (the text
    columns' accumulated attention), with ``query`` [B, Hq, Lq, D] and the prompt's
    contiguous ``keys``/``values`` [B, Hkv, Lk, D]."""
    batch, kv_heads, k_len = keys.shape[0], keys.shape[1], keys.shape[2]
    kept_text = layout.text_slots  # heavy hitters + most recent under A-VL's budget
    if layout.text_split is not None:
        kept_text = keep_heavy(kept_text, text_scores, layout.text_split)
    position = torch.full((batch, kv_heads, layout.capacity), -1, dtype=torch.long,
                          device=keys.device)  # fmt: skip
    evicted: list[Tensor] = []  # image rows that leave the cache (recall keeps them)
    for b, (_, _, image_end, start, end) in enumerate(layout.bounds):
        candidates, n_secondary = layout.candidates[b], layout.n_secondary[b]
        core, others, rest = ranked_groups(
            image_score[b], candidates, layout.n_core[b], n_secondary, k_len
        )
        if plan.recall_page_size:  # only recall keeps them
            image_pos = layout.image_pos[b]
            if candidates.numel() == image_pos.numel():  # no prefill filter
                evicted.append(rest)
            else:  # the filter's survivors are a subset of the image tokens
                secondary = torch.cat([core, others])
                evicted.append(without(image_pos, secondary, k_len))
        position[b, :, :image_end] = torch.cat([others, layout.sink[b], core])
        # every kv head keeps as many text rows (the budget), in positional order
        position[b, :, start:end] = first_marked(kept_text[b], end - start)
    safe = position.clamp(min=0)
    slot_keys = pick_rows(keys, safe)  # free slots hold copies of row 0; never attended
    not_text = layout.not_text
    last_qk = image_ordinal = core_pages = recall_pages = None
    if plan.recall_page_size:  # the first swap's query: the last prompt token's
        last_qk = slot_logits(query[:, :, -1:], slot_keys, scale).mean(dim=1)
        recall_pages = page_tensors(keys, values, evicted, plan.recall_page_size)
    if plan.core_page_size:
        assert layout.image_positions is not None
        image_ordinal = image_ordinals(position[:, 0], layout.image_slot, layout.image_positions)
        core_pages = core_page_tensors(
            slot_keys, image_ordinal, layout.image_positions.shape[1], plan.core_page_size,
            score_dtype(query.dtype),
        )  # fmt: skip
    return PrefillRows(
        position=position,
        slot_keys=slot_keys,
        slot_values=pick_rows(values, safe),
        text_rank=layout.text_rank.gather(2, safe).masked_fill(not_text, -1),
        text_score=text_scores.gather(2, safe).masked_fill(not_text, 0.0),
        last_qk=last_qk,
        image_ordinal=image_ordinal,
        core_pages=core_pages,
        recall_pages=recall_pages,
    )


def scored_prefill_rows(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    lse: Tensor,
    scale: float,
    layout: PromptLayout,
    plan: RowPlan,
    combine_heads: Callable[[Tensor], Tensor] | None = None,
) -> PrefillRows:
    """``prefill_rows`` with the scores taken from the attention's log-sum-exp ``lse``
    [B, Hq, Lq] (``LseScoring``: a CPU's); ``combine_heads``: the image score's mean over
    every rank's heads (tensor parallel; never compiled: it talks to the other ranks)."""
    scoring = layout.scoring
    assert scoring is not None
    image_score = scoring.last_row_score(query, keys, lse, scale, layout.query_valid)
    if combine_heads is not None:
        image_score = combine_heads(image_score)
    text_scores = scoring.column_sums(query, keys, lse, scale, layout.query_valid)
    return prefill_rows(query, keys, values, image_score, text_scores, scale, layout, plan)


@functools.cache
def compiled_prefill_rows():
    """``scored_prefill_rows`` compiled by Inductor, made at first use (a compiled function
    is a cache of graphs keyed by guards, not a registry: one serves every model). Not
    ``fullgraph``: past dynamo's recompile limit (many prompt layouts in one process) it
    runs eagerly, the same rows, instead of failing."""
    return torch.compile(scored_prefill_rows)


def why_not_native(query: Tensor, keys: Tensor, values: Tensor, lse: Tensor,
                   layout: PromptLayout) -> str | None:  # fmt: skip
    """Why this layer's selection cannot run as the C op (``native_prefill_rows``), or
    None. The answer follows from the layout and the tensors' dtypes, devices and last
    strides, so the layout keeps it per such signature for its other layers (the checks
    cost ~30 us a layer inside a prefill on ``cpu-host``)."""
    signature = (
        query.dtype, keys.dtype, values.dtype, lse.dtype, query.is_cpu, keys.is_cpu,
        values.is_cpu, lse.is_cpu, query.stride(-1), keys.stride(-1), values.stride(-1),
    )  # fmt: skip
    reasons = layout.native_reasons
    if signature not in reasons:
        reasons[signature] = _why_not_native(query, keys, values, lse, layout)
    return reasons[signature]


def _why_not_native(query: Tensor, keys: Tensor, values: Tensor, lse: Tensor,
                    layout: PromptLayout) -> str | None:  # fmt: skip
    if layout.scoring is None:
        return "no log-sum-exp scores (not on a CPU)"
    pairs = zip(layout.candidates, layout.image_pos, strict=True)
    if any(c.numel() != p.numel() for c, p in pairs):
        return "the prefill filter is on"  # its evicted rows are not the ranking's rest
    # (the layout's tables are made contiguous, on the layout's device, in the scores' dtype)
    tensors = {"query": query, "keys": keys, "values": values, "lse": lse}
    return native_prefill_rows.why_not_native(tensors)


def native_selection(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    lse: Tensor,
    scale: float,
    layout: PromptLayout,
    plan: RowPlan,
) -> PrefillRows:
    """``scored_prefill_rows`` as one call of C code (``avl::prefill_rows``; where
    ``why_not_native`` is None): the same rows, pages and state."""
    tables = layout.native_tables
    recall_pages = 1
    if plan.recall_page_size:
        size = plan.recall_page_size
        recall_pages = max(max(pages_of(e, size) for e in layout.evicted_per_row), 1)
    core_pages = 0
    if plan.core_page_size:
        assert layout.image_positions is not None
        core_pages = pages_of(layout.image_positions.shape[1], plan.core_page_size)
    (position, slot_keys, slot_values, text_rank, text_score, last_qk, page_positions,
     page_keys, page_values, page_low, page_high, image_ordinal, core_low, core_high,
     members, *copies) = native_prefill_rows.prefill_rows(
        query, keys, values, lse, *tables[:-1], tables.first_row, scale, layout.capacity,
        plan.recall_page_size, recall_pages, plan.core_page_size, core_pages, layout.role,
        layout.counters, layout.text_options,
    )  # fmt: skip
    recall = bool(plan.recall_page_size)
    core = bool(plan.core_page_size)
    return PrefillRows(
        position=position,
        slot_keys=slot_keys,
        slot_values=slot_values,
        text_rank=text_rank,
        text_score=text_score,
        last_qk=last_qk if recall else None,
        image_ordinal=image_ordinal if core else None,
        core_pages=(core_low, core_high, members) if core else None,
        recall_pages=(page_positions, page_keys, page_values, page_low, page_high)
        if recall
        else None,
        state_copies=StateCopies(*copies),
    )
