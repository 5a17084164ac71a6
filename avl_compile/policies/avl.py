"""A-VL adaptive attention at one decoder attention site: the prefill selection, the host-side
schedule of the decode and the decode step's wiring (the step itself, a pure tensor function,
is in ``avl_decode.py``).

After prefill the layer's cache is laid out, per batch row and the same in every kv head,

    [other secondary image rows | sink | core image rows | kept text | free]

The sink is the prompt before the first image (never evicted). The free slots at the end
take the decode tokens (``decode_schedule.py``). Every count (kept text per row, rows in
use, when to re-allocate, which step refreshes) follows from the budgets alone, so the host
knows it without reading the device: ``AvlSchedule``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from avl_compile.options import AvlOptions
from avl_compile.policies.avl_decode import (
    AdaptiveAvlSlots,
    AvlSlots,
    PagedAvlSlots,
    avl_decode_step,
)
from avl_compile.policies.avl_layout import PromptLayout, prompt_layout, text_budgets
from avl_compile.policies.avl_prefill_rows import (
    RowPlan,
    StateCopies,
    compiled_prefill_rows,
    native_selection,
    prefill_rows,
    scored_prefill_rows,
    why_not_native,
)
from avl_compile.policies.budgets import is_refresh_step
from avl_compile.policies.common import (
    PrefillContext,
    column_sums,
    last_token_image_filter,
    last_token_score,
    prefill_attention,
    prefill_logits_bias,
    score_dtype,
)
from avl_compile.policies.decode_schedule import (
    DecodeSchedule,
    LayerState,
    begin_step_and_grow,
)
from avl_compile.policies.page_core import CorePages
from avl_compile.policies.recall import RecallState, host_pages
from avl_compile.policies.recall_copies import plan_next_swap, swap_through_copies


@dataclasses.dataclass(kw_only=True)
class AvlSchedule(DecodeSchedule):
    """The host's side of one prompt's A-VL decode, shared by its layers: every count
    follows from the budgets (not from scores), so nothing is read back from the device."""

    options: AvlOptions
    text_start: list[int]  # per batch row: first text slot
    kept_text: list[int]  # text rows in the cache
    n_text: list[int]  # text tokens seen, kept or not
    attended_base: list[int]  # sink + core rows, attended at every step
    others: list[int]  # secondary image rows outside the core, attended at refresh steps
    attended_text: list[int] = dataclasses.field(default_factory=list)  # this step's text rows

    @property
    def decode_kind(self) -> str:
        return decode_kind_of(self.options)

    @property
    def rows_in_use(self) -> int:
        return max(s + k for s, k in zip(self.text_start, self.kept_text, strict=True))

    def refresh_at(self, step: int) -> bool:
        """Whether ``step`` attends every secondary image row and re-picks the core (with
        refresh_every = -1 the core is the whole secondary set: never)."""
        k = self.options.refresh_every
        if self.options.core_page_size and not self.options.recall_pages:
            return False  # the core is chosen at every step; nothing else refreshes
        return k != -1 and is_refresh_step(step, k)

    def advance(self) -> None:
        self.n_text = [n + 1 for n in self.n_text]
        budgets = text_budgets(self.n_text, self.options)
        self.attended_text = [k + 1 for k in self.kept_text]  # the new token, before a trim
        self.kept_text = [min(k + 1, b) for k, b in zip(self.kept_text, budgets, strict=True)]

    @property
    def attended_rows(self) -> float:
        refresh = self.refresh and not self.options.core_page_size  # never all secondary
        rows = [
            base + text + (other if refresh else 0)
            for base, text, other in zip(
                self.attended_base, self.attended_text, self.others, strict=True
            )
        ]
        return sum(rows) / len(rows)


def decode_kind_of(options: AvlOptions) -> str:
    """The decode step an A-VL option set needs: "avl-recall" or "avl-recall-pages"
    (recall, without or with the query-aware core), "avl-pages" (the query-aware core),
    "avl-adaptive" (adaptive refresh) or "avl"; after a colon, the numbers such a step
    holds in its code (pages per swap, the core's page size), so that a graph built for
    others never serves these options (``decode_kind_base`` drops them)."""
    if options.recall_pages:
        if options.core_page_size:
            return f"avl-recall-pages:{options.recall_pages}:{options.core_page_size}"
        return f"avl-recall:{options.recall_pages}"
    if options.refresh_lse_drop is not None:
        return "avl-adaptive"
    return f"avl-pages:{options.core_page_size}" if options.core_page_size else "avl"


def decode_kind_base(kind: str) -> str:
    """A ``decode_kind_of`` kind without the numbers its step holds."""
    return kind.split(":", 1)[0]


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
    ) -> tuple[Tensor, Tensor, Tensor, LayerState]:
        opts = self.options
        batch, k_len, device = keys.shape[0], keys.shape[2], query.device
        layout = self._layout(query, keys, attn_mask, is_causal, context)
        scoring = layout.scoring
        plan = RowPlan.of(opts)
        if scoring is not None:  # a CPU's: the scores from the log-sum-exp
            output, lse = scoring.attend(query, keys, values, scale)
            compiled = opts.inner == "inductor" and context.combine_heads is None
            if compiled and why_not_native(query, keys, values, lse, layout) is None:
                # the C code reads the projection's [B, L, H, D] layout in place
                rows = native_selection(query, keys, values, lse, scale, layout, plan)
            else:
                # that layout: the scores' matmuls would copy it per use
                keys = keys.contiguous()
                select = compiled_prefill_rows() if compiled else scored_prefill_rows
                rows = select(query, keys, values, lse, scale, layout, plan, context.combine_heads)
        else:  # recompute the probabilities block by block
            keys = keys.contiguous()
            q_len, filtered = query.shape[2], self._filtered_keys(context)
            bias = prefill_logits_bias(attn_mask, is_causal, q_len, k_len, device)
            output, bias = prefill_attention(
                query, keys, values, attn_mask, is_causal, scale, bias, filtered
            )
            image_score = last_token_score(
                query, keys, bias, scale, layout.window, layout.query_valid
            )
            text_scores = column_sums(query, keys, bias, scale, layout.query_valid)
            if context.combine_heads is not None:
                image_score = context.combine_heads(image_score)
            rows = prefill_rows(query, keys, values, image_score, text_scores, scale, layout, plan)
        slots_class = self._slots_class()
        acc = score_dtype(query.dtype)
        last_qk = rows.last_qk
        if last_qk is None:  # never read where recall is off
            last_qk = torch.zeros((batch, layout.capacity), dtype=acc, device=device)
        paged = {} if rows.image_ordinal is None else {"image_ordinal": rows.image_ordinal}
        # this layer's own state (the layout's is shared by the layers)
        copies = rows.state_copies or StateCopies.of(layout, query)
        slots = slots_class(
            role=copies.role,
            position=rows.position,
            text_rank=rows.text_rank,
            text_score=rows.text_score,
            counters=copies.counters,
            text_options=copies.text_options,
            last_qk=last_qk,
            **paged,
            **self._refresh_state(batch, device),
        )
        if opts.vision_keep_layers is not None:  # counts differ by layer: one schedule each
            schedule = self._schedule(layout, k_len)
        else:  # one schedule for the prompt's layers, made by the first
            if context.schedule is None:
                context.schedule = self._schedule(layout, k_len)
            schedule = context.schedule
        state = LayerState(slots=slots, schedule=schedule, combine_heads=context.combine_heads)
        if rows.core_pages is not None:
            assert isinstance(slots, PagedAvlSlots) and layout.image_positions is not None
            state.core_pages = CorePages(layout.image_positions, *rows.core_pages)
        if rows.recall_pages is not None:
            state.recall = RecallState(
                # every image row outside the secondary set is evicted to a page
                pages=host_pages(rows.recall_pages, held_rows=layout.evicted_rows),
                last_query=copies.last_query,  # written in place at each step
            )
            if keys.device.type != "cpu" and state.next_refresh:
                # a GPU's runtime-call route: the first step's pages chosen now, their
                # numbers copied to the host while the prefill's later layers run (the
                # staged graphs choose them again at their first step)
                plan_next_swap(state.recall, 1, opts.recall_pages)
        # free slots hold copies of row 0; they are never attended
        return output, rows.slot_keys, rows.slot_values, state

    def _schedule(self, layout: PromptLayout, k_len: int) -> AvlSchedule:
        """The host's side of the decode, from the layout's counts."""
        opts = self.options
        every_step = opts.refresh_every == -1  # the whole secondary set is the core
        bounds = layout.bounds
        core_rows = layout.n_secondary if every_step else layout.n_core
        return AvlSchedule(
            options=opts,
            text_start=[t for *_, t, _ in bounds],
            kept_text=[e - t for *_, t, e in bounds],
            n_text=layout.n_text,
            attended_base=[c - o + k for (o, c, *_), k in zip(bounds, core_rows, strict=True)],
            others=[
                0 if every_step else s - k
                for s, k in zip(layout.n_secondary, layout.n_core, strict=True)
            ],
            position=k_len,
        )

    def _layout(
        self,
        query: Tensor,
        keys: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        context: PrefillContext,
    ) -> PromptLayout:
        """This prompt's layout for this layer's filter and budgets: made by the first layer
        that needs it, shared by the others."""
        filtered = self._filtered_keys(context)
        budgets = self.options.layer_budgets(self.layer_idx)
        # layers of one model may mask differently (sliding-window layers): the layout holds
        # its mask, so the mask's id is not reused while the prompt's layouts live
        key = (filtered is not None, *budgets, is_causal, id(attn_mask))
        if key not in context.layouts:
            context.layouts[key] = prompt_layout(
                query, keys, attn_mask, is_causal, context, filtered, budgets, self.options
            )
        return context.layouts[key]

    def _slots_class(self) -> type[AvlSlots]:
        if self.options.core_page_size:
            return PagedAvlSlots
        return AdaptiveAvlSlots if self.options.refresh_lse_drop is not None else AvlSlots

    def _refresh_state(self, batch: int, device) -> dict:
        """Adaptive refresh's state per batch row (``AdaptiveAvlSlots``), if it is on:
        the threshold, no watched value yet (NaN), no refresh fired."""
        drop = self.options.refresh_lse_drop
        if drop is None:
            return {}
        row = torch.tensor([drop, float("nan"), 0.0], dtype=torch.float64, device=device)
        return {"refresh_state": row.repeat(batch, 1)}

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
        state: LayerState,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One decode step called from Python (the runtime-call wiring); a compiled decode
        graph runs the same ``avl_decode_step`` inside the graph."""
        recall, opts = state.recall, self.options
        if recall is not None and state.next_refresh:
            swap_through_copies(
                recall, past_keys, past_values, state.slots, opts.recall_pages, scale,
                state.core_pages, step=state.step + 1,
            )  # fmt: skip
        schedule, keys, values = begin_step_and_grow(state, past_keys, past_values)
        if recall is not None:
            recall.last_query.copy_(query[:, :, -1])
            if state.next_refresh:  # its pages' numbers reach the host while this step runs
                plan_next_swap(recall, state.step + 1, opts.recall_pages)
        output = avl_decode_step(
            query,
            new_keys,
            new_values,
            keys,
            values,
            state.slots,
            scale,
            schedule.refresh,
            state.core_pages,
            state.combine_heads,
            keep_qk=recall is not None,
        )
        return output, keys, values
