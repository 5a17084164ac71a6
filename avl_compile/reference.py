"""Plain eager reference of the A-VL policy: the oracle the compiled path is tested against
(the baselines' references are in ``reference_baselines.py`` and plug in here).

No compiler, no cache compaction: like the authors' code, the full KV cache is kept and the
policy is applied with masks over it. It plugs into transformers' attention interface, so
the model runs unchanged; only the attention function differs.

    tokens = reference_generate(model, inputs, options, max_new_tokens=32, do_sample=False)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from avl_compile.options import AvlOptions
from avl_compile.policies.budgets import (
    best_first,
    fraction_count,
    is_refresh_step,
    split_text_budget,
    text_budget,
)

ATTENTION_NAME = "avl_reference"


@dataclasses.dataclass
class _LayerMemory:
    """What one layer remembers between steps, indexed by cache position."""

    sink: Tensor  # [B, L] bool
    image: Tensor  # [B, L] bool, all image tokens of the prompt
    secondary: Tensor  # [B, L] bool, image tokens still in the cache
    core: Tensor  # [B, L] bool
    text_kept: Tensor  # [B, Hkv, L] bool
    text_score: Tensor  # [B, Hkv, L] accumulated attention
    n_text: list[int]
    n_core: list[int]
    step: int = 0
    # recall: per batch row, the host pages (lists of evicted image positions)
    pages: list[list[list[int]]] = dataclasses.field(default_factory=list)
    # adaptive refresh: the core's log-sum-exp at the last refresh (NaN before the first
    # decode step), refreshes it fired, and this step's rows that refresh and logits
    core_lse: Tensor | None = None  # [B]
    adaptive_refreshes: Tensor | None = None  # [B]
    refresh_rows: Tensor | None = None  # [B] bool
    logits: Tensor | None = None  # [B, Hq, L]

    def grow(self) -> None:
        """Append the new decode token: a text token, kept, with no attention yet."""

        def pad(t: Tensor, value) -> Tensor:
            return torch.cat([t, torch.full_like(t[..., :1], value)], dim=-1)

        self.sink, self.image = pad(self.sink, False), pad(self.image, False)
        self.secondary, self.core = pad(self.secondary, False), pad(self.core, False)
        self.text_kept, self.text_score = pad(self.text_kept, True), pad(self.text_score, 0.0)
        self.n_text = [n + 1 for n in self.n_text]


class AvlReference:
    """Holds the options, the prompt's image mask and each layer's memory for one generate."""

    def __init__(self, options: AvlOptions, image_mask: Tensor) -> None:
        self.options = options
        self.image_mask = image_mask.bool()
        self.layers: dict[int, _LayerMemory] = {}
        self.filter_keep: Tensor | None = None

    # -- the attention function (transformers' AttentionInterface signature)
    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        group = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
        allowed = attention_mask.bool()  # [B, 1, q, k] from the bool mask function below
        if query.shape[2] > 1:
            policy_mask = self._prefill_mask(module.layer_idx, query, key, allowed, scale)
        else:
            policy_mask = self._decode_mask(module.layer_idx, query[:, :, -1], key, group, scale)
        allowed = allowed & policy_mask
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        logits = torch.matmul(query.to(acc), key.to(acc).transpose(-1, -2)) * scale
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        probs = probs.nan_to_num(0.0)  # fully masked rows (left padding)
        output = torch.matmul(probs, value.to(acc)).to(query.dtype)
        if query.shape[2] > 1:
            self._after_prefill(module.layer_idx, probs, allowed, group)
        else:
            self._after_decode(module.layer_idx, probs, group)
        if self.options.recall_pages:
            self._recall(module.layer_idx, query[:, :, -1], key)
        return output.transpose(1, 2).contiguous(), None

    # -- prefill
    def _filter_fraction(self) -> float | None:
        """Share of image tokens the prefill filter keeps, None when there is no filter."""
        return self.options.prefill_filter_keep

    def _prefill_mask(self, layer: int, query, key, allowed, scale) -> Tensor:
        opts = self.options
        keep_fraction = self._filter_fraction()
        if keep_fraction is None:
            return torch.ones_like(allowed)
        if layer == opts.prefill_filter_layer - 1:
            logits = torch.matmul(query[:, :, -1:].double(), key.double().transpose(-1, -2))
            logits = (logits * scale).masked_fill(~allowed[:, :, -1:], float("-inf"))
            score = torch.softmax(logits, dim=-1)[:, :, 0].mean(dim=1)
            self.filter_keep = torch.zeros_like(self.image_mask)
            for b in range(score.shape[0]):
                image_pos = self.image_mask[b].nonzero().flatten()
                count = fraction_count(keep_fraction, image_pos.numel())
                best = best_first(score[b, image_pos], image_pos)[:count]
                self.filter_keep[b, image_pos[best]] = True
        if layer >= opts.prefill_filter_layer:
            visible = ~self.image_mask | self.filter_keep
            return visible[:, None, None, :]
        return torch.ones_like(allowed)

    def _after_prefill(self, layer: int, probs: Tensor, allowed: Tensor, group: int) -> None:
        opts = self.options
        batch, q_heads, length, _ = probs.shape
        kv_heads = q_heads // group
        key_valid = allowed[:, 0, -1, :]  # not padding, not filtered out
        # head-averaged attention of the last w prompt tokens (w = 1: A-VL's last token)
        window = min(opts.score_window, length)
        last_row = probs[:, :, -window:, :]
        if window > 1:  # summed over the tokens that are not padding
            last_row = last_row * key_valid[:, None, -window:, None]
        last_row = last_row.sum(dim=2).mean(dim=1)
        column_sums = (probs * key_valid[:, None, :, None]).sum(dim=2)
        column_sums = column_sums.view(batch, kv_heads, group, length).sum(dim=2)
        memory = _LayerMemory(
            sink=torch.zeros(batch, length, dtype=torch.bool),
            image=self.image_mask.clone(),
            secondary=torch.zeros(batch, length, dtype=torch.bool),
            core=torch.zeros(batch, length, dtype=torch.bool),
            text_kept=torch.zeros(batch, kv_heads, length, dtype=torch.bool),
            text_score=column_sums.clone(),
            n_text=[],
            n_core=[],
        )
        filtered = self.filter_keep is not None and layer >= opts.prefill_filter_layer
        for b in range(batch):
            image_pos = self.image_mask[b].nonzero().flatten()
            n_images = image_pos.numel()
            first_image = int(image_pos[0])
            for j in range(length):
                if key_valid[b, j] and j < first_image:
                    memory.sink[b, j] = True
            candidates = self.filter_keep[b].nonzero().flatten() if filtered else image_pos
            vision_keep, vision_compute = opts.layer_budgets(layer)
            for fraction, target in (
                (vision_keep, memory.secondary),
                (vision_compute, memory.core),
            ):
                count = min(fraction_count(fraction, n_images), candidates.numel())
                best = best_first(last_row[b, candidates], candidates)[:count]
                target[b, candidates[best]] = True
            text = [
                j
                for j in range(first_image, length)
                if key_valid[b, j] and not self.image_mask[b, j]
            ]
            memory.n_text.append(len(text))
            memory.n_core.append(fraction_count(vision_compute, n_images))
            for h in range(kv_heads):
                for j in self._h2o_keep(text, column_sums[b, h], len(text)):
                    memory.text_kept[b, h, j] = True
            evicted = (self.image_mask[b] & ~memory.secondary[b]).nonzero().flatten().tolist()
            size = opts.recall_page_size
            memory.pages.append([evicted[i : i + size] for i in range(0, len(evicted), size)])
        self.layers[layer] = memory

    # -- decode
    def _decode_mask(
        self, layer: int, query: Tensor, key: Tensor, group: int, scale: float
    ) -> Tensor:
        memory = self.layers[layer]
        memory.grow()
        memory.step += 1
        assert memory.sink.shape[-1] == key.shape[2], "reference: cache and memory disagree"
        refresh = is_refresh_step(memory.step, self.options.refresh_every)
        memory.refresh_rows = torch.full((key.shape[0],), refresh, device=key.device)
        if self.options.refresh_lse_drop is not None:
            self._adaptive_refresh(memory, query, key, scale, refresh)
        image_rows = torch.where(memory.refresh_rows[:, None], memory.secondary, memory.core)
        if self.options.core_page_size:
            self._pick_core_by_pages(memory, query, key)
            image_rows = memory.core
        shared = (memory.sink | image_rows)[:, None, :] | memory.text_kept
        return shared.repeat_interleave(group, dim=1)[:, :, None, :]  # [B, Hq, 1, L]

    def _after_decode(self, layer: int, probs: Tensor, group: int) -> None:
        opts = self.options
        memory = self.layers[layer]
        batch, q_heads, _, length = probs.shape
        kv_heads = q_heads // group
        row = probs[:, :, 0, :]
        per_kv_head = row.view(batch, kv_heads, group, length).sum(dim=2)
        memory.text_score += per_kv_head * memory.text_kept
        repick = not opts.core_page_size  # the query-aware core is chosen before attention
        if repick and opts.refresh_every != -1 and bool(memory.refresh_rows.any()):
            head_mean = row.mean(dim=1)
            previous_core = memory.core
            memory.core = torch.where(memory.refresh_rows[:, None], False, memory.core)
            for b in memory.refresh_rows.nonzero().flatten().tolist():
                secondary = memory.secondary[b].nonzero().flatten()
                count = min(memory.n_core[b], secondary.numel())
                in_core = previous_core[b, secondary]  # ties: rows already in the core stay
                best = best_first(head_mean[b, secondary], secondary, in_core)[:count]
                memory.core[b, secondary[best]] = True
        if opts.refresh_lse_drop is not None:  # the watched value: the new core's
            renew = memory.core_lse.isnan() | memory.refresh_rows
            now = _core_lse(memory.logits, memory.core)
            memory.core_lse = torch.where(renew, now, memory.core_lse)
        for b in range(batch):
            for h in range(kv_heads):
                kept = memory.text_kept[b, h].nonzero().flatten().tolist()
                keep = set(self._h2o_keep(kept, memory.text_score[b, h], memory.n_text[b]))
                for j in kept:
                    memory.text_kept[b, h, j] = j in keep

    def _adaptive_refresh(
        self, memory: _LayerMemory, query: Tensor, keys: Tensor, scale: float, scheduled: bool
    ) -> None:
        """Adaptive refresh: a batch row refreshes at this step (attends every secondary
        image row, then re-picks its core) when its core's log-sum-exp of this step's
        logits, averaged over query heads, is more than ``refresh_lse_drop`` nats below
        its value at the row's last refresh (before the first refresh: at the first decode
        step). The value is taken again, over the new core, at every refresh."""
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        memory.logits = torch.einsum("bhd,bhld->bhl", query.to(acc), keys.to(acc)) * scale
        if memory.core_lse is None:
            batch, device = query.shape[0], query.device
            memory.core_lse = torch.full((batch,), float("nan"), dtype=acc, device=device)
            memory.adaptive_refreshes = torch.zeros(batch, dtype=torch.long, device=device)
        lse = _core_lse(memory.logits, memory.core)
        fired = lse < memory.core_lse - self.options.refresh_lse_drop  # NaN: never
        if not scheduled:
            memory.adaptive_refreshes += fired
        memory.refresh_rows = memory.refresh_rows | fired

    def _pick_core_by_pages(self, memory: _LayerMemory, query: Tensor, keys: Tensor) -> None:
        """The query-aware core, from this step's query [B, Hq, D] and the keys [B, Hq, L, D]
        (repeated per query head): page j holds the prompt's image tokens j*P ... (j+1)*P - 1
        (P = core_page_size); its digest is the element-wise min and max of the keys of its
        secondary rows, its bound the largest q.k inside that box summed over the head
        dimension and averaged over query heads. Each secondary row scores its page's bound;
        the best n_core rows are the core (ties: rows in the core stay, then lower position)."""
        size = self.options.core_page_size
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        q, k = query.to(acc), keys.to(acc)
        previous, memory.core = memory.core, torch.zeros_like(memory.core)
        for b in range(q.shape[0]):
            image_pos = self.image_mask[b].nonzero().flatten()
            secondary = memory.secondary[b].nonzero().flatten()
            page = torch.searchsorted(image_pos, secondary) // size
            score = torch.empty(secondary.numel(), dtype=torch.float64)
            for p in page.unique().tolist():
                box = k[b][:, secondary[page == p]]  # [Hq, rows, D]
                score[page == p] = _box_bound(q[b], box)
            count = min(memory.n_core[b], secondary.numel())
            best = best_first(score, secondary, previous[b, secondary])[:count]
            memory.core[b, secondary[best]] = True

    def _recall(self, layer: int, query: Tensor, keys: Tensor) -> None:
        """Before a refresh step, bring host pages back, decided on the query of the token
        just run (the next step's is not known yet: one device-to-host read per refresh on
        a GPU). A page's digest is the element-wise min and max of its keys per kv head; its
        bound is the largest q.k a key inside that box can give, summed over the head
        dimension and averaged over query heads (as A-VL's score). The ``recall_pages``
        pages of the highest bound (ties: the earlier page) come back; then the resident
        image rows (secondary set, core included) and the recalled rows are ranked by their
        head-averaged q.k (the tie rule: the lower position first) and the best keep the
        resident places; the others become those pages. Resident rows never grow."""
        opts = self.options
        memory = self.layers[layer]
        if opts.refresh_every == -1 or not is_refresh_step(memory.step + 1, opts.refresh_every):
            return
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        q, k = query.to(acc), keys.to(acc)  # [B, Hq, D], [B, Hq, L, D] (repeated per q head)
        exact = torch.einsum("bhd,bhld->bhl", q, k).mean(dim=1)  # [B, L]
        for b, pages in enumerate(memory.pages):
            if not pages:
                continue
            bounds = [_box_bound(q[b], k[b][:, rows]) for rows in pages]  # rows: [Hq, n, D]
            chosen = sorted(
                sorted(range(len(pages)), key=lambda p: (-bounds[p], p))[: opts.recall_pages]
            )
            resident = memory.secondary[b].nonzero().flatten().tolist()
            candidates = torch.tensor(resident + [j for p in chosen for j in pages[p]])
            # float64: best_first's one-key sort is for non-negative float32 scores only
            order = best_first(exact[b, candidates].double(), candidates)
            stay = set(candidates[order[: len(resident)]].tolist())
            leave = sorted(set(candidates.tolist()) - stay)
            for j in resident:
                if j not in stay:
                    memory.secondary[b, j] = memory.core[b, j] = False
            for j in stay:
                memory.secondary[b, j] = True
            for p in chosen:  # the rows that leave fill the recalled pages, in order
                pages[p], leave = leave[: len(pages[p])], leave[len(pages[p]) :]

    def _h2o_keep(self, kept: list[int], score: Tensor, n_text: int) -> list[int]:
        """Text positions to keep: the most recent ones plus the heaviest of the older ones."""
        opts = self.options
        budget = text_budget(n_text, opts.text_keep, opts.text_min_budget)
        if len(kept) <= budget:
            return kept
        n_heavy, n_recent = split_text_budget(budget, opts.text_heavy_share)
        older, recent = kept[: len(kept) - n_recent], kept[len(kept) - n_recent :]
        if n_heavy == 0 or not older:
            return recent
        # the tie rule: among equal scores the lower position stays
        heavy = sorted(older, key=lambda j: float(score[j]), reverse=True)[:n_heavy]
        return sorted(heavy) + recent


def _core_lse(logits: Tensor, core: Tensor) -> Tensor:
    """Log-sum-exp of ``logits`` [B, Hq, L] over the ``core`` [B, L] rows, averaged over
    query heads: [B] (-inf for an empty core)."""
    masked = logits.masked_fill(~core[:, None, :], float("-inf"))
    return torch.logsumexp(masked, dim=-1).mean(dim=1)


def _box_bound(query: Tensor, keys: Tensor) -> float:
    """The largest q.k a key inside the element-wise min/max box of ``keys`` [Hq, n, D] can
    give, summed over the head dimension and averaged over query heads (``query`` [Hq, D])."""
    low, high = keys.amin(dim=1), keys.amax(dim=1)
    return float(torch.maximum(query * low, query * high).sum(-1).mean())


def _bool_mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False  # the reference always wants an explicit mask
    return sdpa_mask(*args, **kwargs)


_active: list[AvlReference] = []


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    return _active[-1].attention(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _dispatch)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _bool_mask)


@contextlib.contextmanager
def reference_attention(model, reference: AvlReference):
    """Run ``model``'s decoder with the reference policy inside the block."""
    language_config = model.config.get_text_config()
    previous = language_config._attn_implementation
    language_config._attn_implementation = ATTENTION_NAME
    _active.append(reference)
    try:
        yield reference
    finally:
        _active.pop()
        language_config._attn_implementation = previous


def _visual_placeholder_mask(config, input_ids: Tensor) -> Tensor:
    """Image and video placeholder positions: video frames (LLaVA-OneVision, Qwen2-VL) are
    image tokens to the policy, under a second placeholder id."""
    mask = input_ids == config.image_token_id
    video_token_id = getattr(config, "video_token_id", None)
    if video_token_id is not None:
        mask = mask | (input_ids == video_token_id)
    return mask


def reference_generate(
    model, inputs: Mapping[str, Any], options: Mapping[str, Any] | None = None, **generate_kwargs
):
    """``model.generate(**inputs)`` under the eager reference policy."""
    opts = AvlOptions.from_mapping(options)
    image_mask = _visual_placeholder_mask(model.config, inputs["input_ids"])
    if opts.policy == "avl":
        reference = AvlReference(opts, image_mask)
    else:
        from avl_compile.reference_baselines import BaselineReference

        reference = BaselineReference(opts, image_mask)
    with reference_attention(model, reference):
        return model.generate(**inputs, **generate_kwargs)
