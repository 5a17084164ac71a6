"""One prompt's A-VL prefill layout: what every decoder layer computes alike.

Where the text, the sink and the image tokens are, the counts the budgets give (secondary
and core image rows, kept text per row: they follow from the budgets, not from the scores),
the cache's slot roles and the scores' masks depend on the prompt alone, so the first
layer makes them and the others read them (one layout per prefill filter, image budgets
and attention mask: sliding-window layers mask differently). A layer then computes only
its scores and which rows they pick; at 32 layers the per-layer host work was most of the
prefill's extra time on a host-bound model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
from torch import Tensor

from avl_compile.options import AvlOptions
from avl_compile.policies.avl_decode import CORE, OTHER, SINK, TEXT
from avl_compile.policies.budgets import fraction_count, text_budget
from avl_compile.policies.common import PrefillContext, RecentSplit, key_is_valid, recent_split
from avl_compile.policies.decode_schedule import spare_slots
from avl_compile.policies.prefill_scores import LseScoring


@dataclasses.dataclass
class PromptLayout:
    """Per batch row lists, and the tensors every layer's slots start from (one layout
    per prefill filter, image budgets and attention mask)."""

    query_valid: Tensor  # [B, Lq] query rows that are not padding
    text_slots: Tensor  # [B, Hkv, Lk] the same in every kv head: H2O's candidates
    text_split: RecentSplit | None  # H2O's score-free half (None: the text fits its budget)
    window: int  # prompt rows the image score sums
    n_text: list[int]  # text tokens per row
    image_pos: list[Tensor]  # each row's image positions
    candidates: list[Tensor]  # the positions its secondary set is chosen from
    sink: list[Tensor]  # the prompt before the first image
    n_secondary: list[int]  # secondary image rows (the core among them)
    n_core: list[int]
    # per row: (others end, core start, image rows end, text start, text end) in the slots
    bounds: list[tuple[int, int, int, int, int]]
    capacity: int  # slots, the free ones included
    role: Tensor  # [B, C] int8
    not_text: Tensor  # [B, 1, C] slots that hold no text
    image_slot: Tensor  # [B, C] slots of secondary image rows
    text_rank: Tensor  # [B, Hkv, Lk] each text token's ordinal among its row's text
    counters: Tensor  # [B, 5] the decode's counters (``AvlSlots``)
    text_options: Tensor  # [3] float64
    image_positions: Tensor | None  # [B, N] for the query-aware core's pages
    scoring: LseScoring | None  # the scores' masks (None off CPUs)
    attn_mask: Tensor | None  # the mask it was made for (held: its id keys the layout)
    # why a layer's selection cannot run in C, per signature of its tensors (None: it can;
    # ``avl_prefill_rows.why_not_native``)
    native_reasons: dict[tuple, str | None] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def native_tables(self) -> NativeTables:
        """This layout as the C selection reads it: packed by the first layer that
        selects in C, read by the others."""
        return native_tables(self)

    @functools.cached_property
    def evicted_per_row(self) -> list[int]:
        """Image rows outside the secondary set per batch row (recall's pages hold them):
        known from the shapes, no read of a device."""
        return [p.numel() - s for p, s in zip(self.image_pos, self.n_secondary, strict=True)]

    @functools.cached_property
    def evicted_rows(self) -> int:
        """``evicted_per_row``, every batch row's."""
        return sum(self.evicted_per_row)


class NativeTables(NamedTuple):
    """A layout's per-row lists and masks packed as ``avl::prefill_rows`` reads them
    (``lowering/prefill_rows.h``): padded int64 tables, contiguous masks."""

    plan: Tensor  # [B, 11] the counts and slot bounds (``PLAN_*`` in prefill_rows.h)
    candidates: Tensor  # [B, N] ascending, padded with -1
    sink: Tensor  # [B, S] ascending, padded with -1
    text_slots: Tensor  # [B, Hkv, Lk] bool
    recent: Tensor  # [B, Hkv, Lk] bool (all False where the text fits its budget)
    text_rank: Tensor  # [B, Hkv, Lk]
    not_text: Tensor  # [B, C] bool
    image_slot: Tensor  # [B, C] bool
    image_positions: Tensor  # [B, N] ([B, 0] without the query-aware core)
    query_valid: Tensor  # [B, Lq] bool
    last_bias: Tensor  # [B or 1, window, Lk]
    columns: Tensor  # [n] the text columns
    column_bias: Tensor  # [B or 1, Lq - first_row, n]
    first_row: int  # the first query row that sees a text column


def _padded(rows: list[Tensor], device) -> Tensor:
    width = max((r.numel() for r in rows), default=0)
    table = torch.full((len(rows), width), -1, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        table[b, : row.numel()] = row
    return table


def native_tables(layout: PromptLayout) -> NativeTables:
    """``layout`` packed for the C selection (a CPU's: ``layout.scoring`` is set)."""
    scoring = layout.scoring
    assert scoring is not None
    device, batch = layout.role.device, layout.role.shape[0]
    split = layout.text_split
    over = [0] * batch if split is None else split.over.flatten().long().tolist()
    heavy = [0] * batch if split is None else split.n_heavy.flatten().tolist()
    plan = torch.tensor(
        [[c.numel(), k, s, z.numel(), *bounds, o, h]
         for c, k, s, z, bounds, o, h in zip(layout.candidates, layout.n_core,
                                             layout.n_secondary, layout.sink, layout.bounds,
                                             over, heavy, strict=True)],
        dtype=torch.long, device=device,
    )  # fmt: skip
    text_slots = layout.text_slots.contiguous()
    recent = torch.zeros_like(text_slots) if split is None else split.recent.contiguous()
    image_positions = layout.image_positions
    if image_positions is None:
        image_positions = torch.zeros(batch, 0, dtype=torch.long, device=device)
    first_row = scoring.blocks[0][0].start if scoring.blocks else layout.query_valid.shape[1]
    n_columns = scoring.columns.numel()
    column_bias = torch.zeros(1, 0, n_columns, dtype=scoring.last_bias.dtype, device=device)
    if scoring.blocks:
        column_bias = torch.cat([bias for _, bias in scoring.blocks], dim=2)[:, 0]
    return NativeTables(
        plan=plan,
        candidates=_padded(layout.candidates, device),
        sink=_padded(layout.sink, device),
        text_slots=text_slots,
        recent=recent,
        text_rank=layout.text_rank.contiguous(),
        not_text=layout.not_text[:, 0].contiguous(),
        image_slot=layout.image_slot.contiguous(),
        image_positions=image_positions.contiguous(),
        query_valid=layout.query_valid.contiguous(),
        last_bias=scoring.last_bias[:, 0].contiguous(),
        columns=scoring.columns.contiguous(),
        column_bias=column_bias.contiguous(),
        first_row=first_row,
    )


def prompt_layout(
    query: Tensor,
    keys: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    context: PrefillContext,
    filtered: Tensor | None,
    budgets: tuple[float, float],
    opts: AvlOptions,
) -> PromptLayout:
    """The layout of the prompt of ``context`` for layers that see the keys ``filtered``
    [B, Lk] lets through (None: all) under image ``budgets`` (keep, compute)."""
    batch, q_len = query.shape[0], query.shape[2]
    kv_heads, k_len = keys.shape[1], keys.shape[2]
    device = query.device
    vision_keep, vision_compute = budgets
    key_valid = key_is_valid(attn_mask, batch, k_len, device)
    if filtered is not None:
        key_valid = key_valid & filtered
    image_mask = context.image_mask
    positions = torch.arange(k_len, device=device)
    first_image_pos = image_mask.int().argmax(dim=-1, keepdim=True)  # [B, 1]
    text_mask = key_valid & ~image_mask & (positions >= first_image_pos)  # [B, Lk]
    query_valid = key_valid[:, k_len - q_len :]
    window = min(opts.score_window, q_len)
    n_text = text_mask.sum(-1).tolist()
    budgets_of_text = text_budgets(n_text, opts)
    # HF sizes an explicit decode mask (a padded batch) from the first layer's cache: with
    # per-layer budgets every layer then puts its text where the widest layer's goes
    widest = max(opts.vision_keep_layers) if opts.vision_keep_layers else vision_keep
    aligned = attn_mask is not None and widest != vision_keep
    first_images = first_image_pos[:, 0].tolist()
    image_pos, candidates, sink, n_secondary, n_core, bounds = [], [], [], [], [], []
    for b in range(batch):
        row_images = torch.nonzero(image_mask[b]).flatten()
        n_images = row_images.numel()
        row_candidates = row_images
        if filtered is not None:  # the prefill filter's survivors
            row_candidates = torch.nonzero(context.filter_keep[b]).flatten()
        row_sink = positions[key_valid[b] & (positions < first_images[b])]
        secondary = max(min(fraction_count(vision_keep, n_images), row_candidates.numel()), 0)
        core = max(min(fraction_count(vision_compute, n_images), secondary), 0)
        image_rows = secondary + row_sink.numel()
        start = image_rows
        if aligned:  # free slots up to the widest layer's text
            start = row_sink.numel() + fraction_count(widest, n_images)
        others = secondary - core
        kept_text = min(n_text[b], budgets_of_text[b])  # H2O keeps the budget, if over it
        bounds.append((others, others + row_sink.numel(), image_rows, start, start + kept_text))
        image_pos.append(row_images)
        candidates.append(row_candidates)
        sink.append(row_sink)
        n_secondary.append(secondary)
        n_core.append(core)
    in_use = max(end for *_, end in bounds)
    capacity = min(in_use + spare_slots(in_use), k_len)
    # with refresh_every = -1 every secondary image row is in the core for good
    other_role = CORE if opts.refresh_every == -1 else OTHER
    role = torch.zeros(batch, capacity, dtype=torch.int8, device=device)
    for b, (o, c, i, t, e) in enumerate(bounds):
        role[b, :o], role[b, o:c], role[b, c:i], role[b, t:e] = other_role, SINK, CORE, TEXT
    text_rank = (text_mask.cumsum(-1) - 1)[:, None, :].expand(batch, kv_heads, k_len)
    counters = torch.tensor(
        [[e, n, k_len, k, t] for (*_, t, e), n, k in zip(bounds, n_text, n_core, strict=True)],
        dtype=torch.long, device=device,
    )  # fmt: skip
    text_options = torch.tensor(
        [opts.text_keep, opts.text_heavy_share, opts.text_min_budget],
        dtype=torch.float64, device=device,
    )  # fmt: skip
    columns = torch.nonzero(text_mask.any(dim=0)).flatten()
    scoring = LseScoring.prepare(
        attn_mask, is_causal, filtered, q_len, k_len, window, columns, query.dtype
    )
    text_slots = text_mask[:, None, :].expand(batch, kv_heads, k_len)
    return PromptLayout(
        query_valid=query_valid,
        text_slots=text_slots,
        text_split=recent_split(text_slots, budgets_of_text, opts.text_heavy_share),
        window=window,
        n_text=n_text,
        image_pos=image_pos,
        candidates=candidates,
        sink=sink,
        n_secondary=n_secondary,
        n_core=n_core,
        bounds=bounds,
        capacity=capacity,
        role=role,
        not_text=(role != TEXT).unsqueeze(1),
        image_slot=(role == OTHER) | (role == CORE),
        text_rank=text_rank,
        counters=counters,
        text_options=text_options,
        # the query-aware core's pages are of the prompt's image tokens
        image_positions=image_positions_of(image_mask) if opts.core_page_size else None,
        scoring=scoring,
        attn_mask=attn_mask,
    )


def text_budgets(n_text: list[int], options: AvlOptions) -> list[int]:
    """A-VL's text budget per row: max(round(T * n_text), min)."""
    return [text_budget(n, options.text_keep, options.text_min_budget) for n in n_text]


def image_positions_of(image_mask: Tensor) -> Tensor:
    """Each row's image positions [B, N] ascending, padded at the end past every position."""
    length = image_mask.shape[-1]
    positions = torch.arange(length, device=image_mask.device).expand_as(image_mask)
    marked = torch.where(image_mask, positions, length + positions)  # non-image rows last
    width = int(image_mask.sum(-1).max())
    return marked.sort(dim=-1).values[:, :width].contiguous()
