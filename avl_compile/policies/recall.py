"""Recall of evicted image rows (past the paper; the eager reference's ``_recall`` is the
judge): the image rows A-VL evicts at prefill are kept in pages of ``recall_page_size`` rows
in host memory, each with a digest per kv head (the element-wise min and max of its keys).
Before each refresh step, the pages whose digest bounds q.k highest under the query just
run come back, the resident image rows and the recalled rows are ranked by their q.k, the
best keep the resident slots and the others become those pages: the rows resident on the
accelerator never grow.

It runs on the host between decode steps, reading the page bounds, the resident slots and
the rows that leave back (three device-to-host reads per layer and batch row at a refresh
step, none at other steps: ``tests/test_beyond_avl.py`` counts them; with the query-aware
core the swapped rows' page buckets are re-derived there too, one more read per batch row),
so a decode with recall runs through the runtime-call graph for now.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from avl_compile.policies.avl_decode import CORE, OTHER, AvlSlots, PagedAvlSlots
from avl_compile.policies.budgets import best_first
from avl_compile.policies.page_core import digest_bound, page_buckets


@dataclasses.dataclass
class HostPages:
    """One layer's evicted image rows, per batch row: a list of pages, each the positions
    and the keys/values [Hkv, n, D] of up to ``page_size`` rows (host memory; pinned on
    CUDA) and their digest [Hkv, D] (min, max; on the cache's device)."""

    positions: list[list[list[int]]]
    keys: list[list[Tensor]]
    values: list[list[Tensor]]
    low: list[list[Tensor]]
    high: list[list[Tensor]]

    @property
    def nbytes(self) -> int:
        """Host-resident KV bytes."""
        return sum(t.nbytes for row in (*self.keys, *self.values) for t in row)


def _to_host(tensor: Tensor) -> Tensor:
    host = tensor.to("cpu", copy=True)
    return host.pin_memory() if tensor.is_cuda else host


def build_pages(keys: Tensor, values: Tensor, evicted: list[Tensor], page_size: int) -> HostPages:
    """Pages of the ``evicted`` positions (per batch row, ascending) of the prompt's
    ``keys``/``values`` [B, Hkv, L, D], in order of position."""
    pages = HostPages([], [], [], [], [])
    for b, rows in enumerate(evicted):
        chunks = [rows[i : i + page_size] for i in range(0, rows.numel(), page_size)]
        page_keys = [keys[b][:, chunk] for chunk in chunks]  # gathered once, on the device
        pages.positions.append([chunk.tolist() for chunk in chunks])
        pages.keys.append([_to_host(page) for page in page_keys])
        pages.values.append([_to_host(values[b][:, chunk]) for chunk in chunks])
        pages.low.append([page.amin(dim=1) for page in page_keys])
        pages.high.append([page.amax(dim=1) for page in page_keys])
    return pages


def recall_before_step(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    slots: AvlSlots,
    pages: HostPages,
    recall_pages: int,
    image_positions: Tensor | None = None,
    core_page_size: int = 0,
) -> None:
    """Swap pages in for the step about to run, decided on ``query`` [B, Hq, D] (the last
    token's); writes ``keys``/``values`` [B, Hkv, C, D] and ``slots`` in place. With the
    query-aware core (``PagedAvlSlots``) the slots' page buckets follow the rows that moved
    (``image_positions`` [B, N] and ``core_page_size`` define the pages)."""
    batch, kv_heads = keys.shape[0], keys.shape[1]
    group = query.shape[1] // kv_heads
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    for b in range(batch):
        if not pages.positions[b]:
            continue
        q = query[b].to(acc)  # [Hq, D]
        low = torch.stack(pages.low[b]).repeat_interleave(group, 1).to(acc)  # [P, Hq, D]
        high = torch.stack(pages.high[b]).repeat_interleave(group, 1).to(acc)
        bounds = digest_bound(q, low, high).mean(-1).tolist()  # one read
        ranked = sorted(range(len(bounds)), key=lambda p: (-bounds[p], p))
        chosen = sorted(ranked[:recall_pages])
        resident_slots = torch.nonzero((slots.role[b] == OTHER) | (slots.role[b] == CORE))
        resident_slots = resident_slots.flatten()
        resident_positions = slots.position[b, 0, resident_slots]
        resident_keys = keys[b][:, resident_slots].to(acc)  # [Hkv, n, D]
        recalled_positions = torch.tensor(
            [j for p in chosen for j in pages.positions[b][p]], device=keys.device
        )
        recalled_keys = torch.cat([pages.keys[b][p] for p in chosen], dim=1).to(keys.device)
        recalled_values = torch.cat([pages.values[b][p] for p in chosen], dim=1)
        recalled_values = recalled_values.to(keys.device)
        candidate_keys = torch.cat([resident_keys, recalled_keys.to(acc)], dim=1)
        # head-averaged q.k, every query head against its kv head's keys
        scores = torch.einsum("hd,hnd->hn", q, candidate_keys.repeat_interleave(group, 0)).mean(0)
        positions = torch.cat([resident_positions, recalled_positions])
        n_resident = resident_slots.numel()
        order = best_first(scores.double(), positions)
        stays = torch.zeros(positions.numel(), dtype=torch.bool, device=keys.device)
        stays[order[:n_resident]] = True
        # resident slots whose row leaves take the recalled rows that stay
        free_slots = resident_slots[~stays[:n_resident]]
        incoming = torch.nonzero(stays[n_resident:]).flatten()
        incoming = incoming[recalled_positions[incoming].argsort()]
        leaving = torch.nonzero(~stays).flatten()
        leaving = leaving[positions[leaving].argsort()]
        leaving_keys = torch.cat([keys[b][:, resident_slots], recalled_keys], dim=1)[:, leaving]
        leaving_values = torch.cat([values[b][:, resident_slots], recalled_values], dim=1)
        leaving_values = leaving_values[:, leaving]
        leaving_positions = positions[leaving].tolist()
        keys[b][:, free_slots] = recalled_keys[:, incoming]
        values[b][:, free_slots] = recalled_values[:, incoming]
        slots.position[b][:, free_slots] = recalled_positions[incoming]
        slots.role[b, free_slots] = OTHER  # a recalled row joins the core at a re-pick
        start = 0
        for p in chosen:  # the rows that leave fill the recalled pages, in order
            size = len(pages.positions[b][p])
            stop = start + size
            page_keys = leaving_keys[:, start:stop]
            pages.positions[b][p] = leaving_positions[start:stop]
            pages.keys[b][p] = _to_host(page_keys)
            pages.values[b][p] = _to_host(leaving_values[:, start:stop])
            pages.low[b][p], pages.high[b][p] = page_keys.amin(dim=1), page_keys.amax(dim=1)
            start = stop
    if isinstance(slots, PagedAvlSlots):
        image = (slots.role == OTHER) | (slots.role == CORE)
        buckets = page_buckets(slots.position[:, 0], image, image_positions, core_page_size)
        slots.page_bucket.copy_(buckets)
