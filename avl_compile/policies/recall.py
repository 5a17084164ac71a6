"""Recall of evicted image rows (past the paper; the eager reference's ``_recall`` is the
judge): the image rows A-VL evicts at prefill are kept in pages of ``recall_page_size`` rows
in host memory, each with a digest per kv head (the element-wise min and max of its keys).
Before each refresh step, the pages whose digest bounds q.k highest under the query just
run come back, the resident image rows and the recalled rows are ranked by their q.k, the
best keep the resident slots and the others become those pages: the rows resident on the
accelerator never grow.

The swap is a fixed-shape tensor function over every batch row at once (the pages are
tensors: P pages of S slots per row, empty ones padded). On a CPU it runs inside the
compiled decode graph, at the start of a refresh step (every layer's swap before the first
layer: ``rewrite_decode_sites.avl_swap_site``; ``RecallState`` holds its tensors, graph
inputs after the slots'), and reads nothing back to the host. On a GPU a graph cannot
index host memory, so its decode graphs are staged: each step's graph chooses the next
swap's pages (their digests are on the device), the host uploads those pages' rows before
the refresh step's graph, which swaps them in and fills buffers with the rows that leave,
copied back after it (``recall_copies``: pinned buffers, side streams; the host waits on
the device only for a copy still in flight). The runtime-call graph (a fallback) swaps
before the step from Python, with the same copies. With the query-aware core the swap
changes the members of the pages it touches and boxes those pages again
(``page_core.CorePages.move``).

A swap ranks once, by a selection (a top-k of M, not a sort of every row: the rows that
leave are the valid ones ranked last); in which order they fill the pages is counted by
comparisons over at most R * S rows (they fuse), and the k-th chosen page, freed slot and
incoming row are found from a cumsum each (``_nth_true``: a small kernel of its own, O(N)
where the comparisons it replaced were N x N). The resident rows' q.k is the last step's
(``AvlSlots.last_qk``), not a pass of the swap's own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from avl_compile.lowering.gathered_attention import score_dtype
from avl_compile.lowering.native_recall_swap import recall_swap, why_not_native
from avl_compile.lowering.slot_attention import slot_logits
from avl_compile.policies.avl_decode import CORE, OTHER, AvlSlots, PagedAvlSlots
from avl_compile.policies.budgets import last_ranked
from avl_compile.policies.page_core import (
    CorePages,
    box_of,
    box_of_held,
    group_bounds,
    held_members,
    image_ordinals,
)

if TYPE_CHECKING:
    from avl_compile.policies.recall_copies import RecallCopies


@dataclasses.dataclass
class HostPages:
    """One layer's evicted image rows in fixed shapes: per batch row P pages (the most any
    row has; a row with fewer holds empty pages at the end) of S = ``recall_page_size``
    slots. A page keeps its row count for good, its rows in its first slots."""

    positions: Tensor  # [B, P, S] int64 on the cache's device; -1: no row
    # host memory (pinned on CUDA); None inside a staged graph, which never sees them
    keys: Tensor  # [B, Hkv, P, S, D]
    values: Tensor  # [B, Hkv, P, S, D]
    low: Tensor  # [B, Hkv, P, D] the digest, on the cache's device (+inf: an empty page)
    high: Tensor  # [B, Hkv, P, D] (-inf: an empty page)
    # the rows held, every batch row's, where the builder knows it from the prompt's layout
    # (swaps keep it: a page keeps its row count); None: counted from the positions
    held_rows: int | None = None

    @property
    def nbytes(self) -> int:
        """Host-resident KV bytes of the rows held (without ``held_rows``, one read of the
        positions: a sync on a GPU)."""
        rows = self.held_rows
        if rows is None:
            rows = int((self.positions >= 0).sum())
        per_row = 2 * self.keys.shape[1] * self.keys.shape[-1] * self.keys.element_size()
        return rows * per_row


@dataclasses.dataclass
class StagedRows:
    """A refresh step's rows between the host pages and a staged decode graph (a GPU's):
    the chosen pages' rows, uploaded before the graph, and buffers the graph fills with the
    rows that leave, copied to the host after it. Alive for one step (accelerator memory
    only while the step runs, as the swap's own rows in a CPU's graph)."""

    recalled_keys: Tensor  # [B, Hkv, R * S, D] on the device
    recalled_values: Tensor
    leaving_keys: Tensor  # [B, Hkv, R * S, D], written by the graph
    leaving_values: Tensor
    # [B, R] the pages they came from and go to, on the host (not a graph input)
    chosen_on_host: Tensor | None = None

    NAMES = ("recalled_keys", "recalled_values", "leaving_keys", "leaving_values")

    def tensors(self) -> tuple[Tensor, ...]:
        return self.recalled_keys, self.recalled_values, self.leaving_keys, self.leaving_values


@dataclasses.dataclass
class RecallState:
    """Recall's per-layer tensors besides the slots: the pages and the last token's query
    (the next refresh step's swap is decided on it).

    Two ways into a compiled decode graph. In-graph (a CPU's): the host pages are graph
    inputs and the graph swaps by itself. Staged (a GPU's, where a graph cannot index host
    memory): ``chosen`` is set, the graph takes the pages' positions and digests but not
    their rows; before a refresh step the host uploads the chosen pages' rows
    (``staged``), the graph swaps them in, fills the leaving rows and chooses the next
    swap's pages into ``chosen``; the host copies happen around the graph
    (``recall_copies``)."""

    pages: HostPages
    last_query: Tensor  # [B, Hq, D], written in place at every step
    # staged: the next swap's pages [B, R] on the device, chosen by the graph at every step
    chosen: Tensor | None = None
    staged: StagedRows | None = None  # staged, at a refresh step: its rows
    # the host copies of a GPU's routes (made at their first swap)
    copies: RecallCopies | None = dataclasses.field(default=None, repr=False)

    NAMES = ("page_positions", "page_keys", "page_values", "page_low", "page_high", "last_query")
    STAGED_NAMES = ("page_positions", "page_low", "page_high", "last_query", "chosen")

    def tensors(self) -> tuple[Tensor, ...]:
        """The decode graph's inputs, in the order of ``names``."""
        pages = self.pages
        if self.chosen is None:
            return (pages.positions, pages.keys, pages.values, pages.low, pages.high,
                    self.last_query)  # fmt: skip
        staged = () if self.staged is None else self.staged.tensors()
        return pages.positions, pages.low, pages.high, self.last_query, self.chosen, *staged

    @staticmethod
    def names(staged: bool = False, refresh: bool = False) -> tuple[str, ...]:
        names = RecallState.STAGED_NAMES if staged else RecallState.NAMES
        return (*names, *StagedRows.NAMES) if staged and refresh else names

    @classmethod
    def from_tensors(cls, tensors: tuple[Tensor, ...], staged: bool = False) -> RecallState:
        """The state a graph's flat inputs hold (``names`` of the same arguments)."""
        if not staged:
            return cls(HostPages(*tensors[:5]), tensors[5])
        positions, low, high, last_query, chosen = tensors[:5]
        staged_rows = StagedRows(*tensors[5:]) if tensors[5:] else None
        pages = HostPages(positions, None, None, low, high)  # type: ignore[arg-type]
        return cls(pages, last_query, chosen, staged_rows)

    def swap(
        self,
        keys: Tensor,
        values: Tensor,
        slots: AvlSlots,
        recall_pages: int,
        scale: float,
        core_pages: CorePages | None = None,
    ) -> None:
        """The swap at the start of a refresh step, inside a decode graph: by itself
        (``recall_before_step``), or staged, with the rows the host uploaded."""
        if self.staged is None:
            recall_before_step(
                self.last_query, keys, values, slots, self.pages, recall_pages, scale,
                core_pages,
            )  # fmt: skip
            return
        assert self.chosen is not None
        staged = self.staged
        leaving_keys, leaving_values = swap_pages_in(
            self.last_query, keys, values, slots, self.pages, self.chosen,
            staged.recalled_keys, staged.recalled_values, scale, core_pages,
        )  # fmt: skip
        staged.leaving_keys.copy_(leaving_keys)
        staged.leaving_values.copy_(leaving_values)

    def after_step(self, query: Tensor, recall_pages: int) -> None:
        """Keep the step's query; staged, choose the next swap's pages from it."""
        self.last_query.copy_(query[:, :, -1])
        if self.chosen is not None:
            self.chosen.copy_(choose_pages(self.last_query, self.pages, recall_pages))


def _to_host(tensor: Tensor) -> Tensor:
    """A fresh tensor (a gather's) in host memory: itself on a CPU, pinned from a GPU."""
    return tensor.to("cpu").pin_memory() if tensor.is_cuda else tensor


def build_pages(keys: Tensor, values: Tensor, evicted: list[Tensor], page_size: int) -> HostPages:
    """Pages of the ``evicted`` positions (per batch row, ascending) of the prompt's
    ``keys``/``values`` [B, Hkv, L, D], in order of position."""
    return host_pages(page_tensors(keys, values, evicted, page_size))


def host_pages(
    tensors: tuple[Tensor, Tensor, Tensor, Tensor, Tensor], held_rows: int | None = None
) -> HostPages:
    """``HostPages`` from ``page_tensors``' five, the rows moved to host memory."""
    positions, keys, values, low, high = tensors
    return HostPages(positions, _to_host(keys), _to_host(values), low, high, held_rows)


def page_tensors(
    keys: Tensor, values: Tensor, evicted: list[Tensor], page_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``build_pages``' positions, keys, values, low and high, all on the keys' device."""
    batch, kv_heads, _, head_dim = keys.shape
    n_pages = max(max(-(-rows.numel() // page_size) for rows in evicted), 1)
    positions = torch.full((batch, n_pages * page_size), -1, dtype=torch.long, device=keys.device)
    for b, rows in enumerate(evicted):
        positions[b, : rows.numel()] = rows
    positions = positions.view(batch, n_pages, page_size)
    # a page's empty slots hold copies of its rows (never read as rows: position -1)
    index = held_members(positions).view(batch, 1, -1, 1).expand(batch, kv_heads, -1, head_dim)
    shape = (batch, kv_heads, n_pages, page_size, head_dim)
    page_keys = keys.gather(2, index).view(shape)
    page_values = values.gather(2, index).view(shape)
    low, high = box_of_held(page_keys, positions >= 0, page_keys.dtype)
    return positions, page_keys, page_values, low, high


def gather_pages(store: Tensor, chosen: Tensor, pinned: bool = False) -> Tensor:
    """The ``chosen`` [B, R] pages (page numbers on the store's device) of a host ``store``
    [B, Hkv, P, S, D] as rows [B, Hkv, R * S, D], in the store's memory (``pinned``: in a
    pinned buffer, for an asynchronous upload)."""
    batch, kv_heads, _, size, head_dim = store.shape
    index = chosen[:, None, :, None, None].expand(-1, kv_heads, -1, size, head_dim)
    if pinned:
        rows = torch.empty(index.shape, dtype=store.dtype, pin_memory=True)
        torch.gather(store, 2, index, out=rows)
    else:
        rows = store.gather(2, index)
    return rows.view(batch, kv_heads, -1, head_dim)


def write_pages(store: Tensor, chosen: Tensor, rows: Tensor) -> None:
    """Write ``rows`` [B, Hkv, R * S, D] into the ``chosen`` [B, R] pages (page numbers on
    the store's device) of ``store`` (a copy to the host on a GPU)."""
    batch, kv_heads, _, size, head_dim = store.shape
    paged = rows.view(batch, kv_heads, -1, size, head_dim).to(store.device)
    store.index_put_(_page_index(chosen.to(store.device), kv_heads), paged)


def _page_index(chosen: Tensor, kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of the ``chosen`` [B, R] pages in every kv head of a [B, Hkv, P, ...] tensor:
    an ``index_put_`` Inductor writes in place (it copies a graph input around a
    ``scatter_``: the host pages' whole store, at every step)."""
    rows = torch.arange(chosen.shape[0], device=chosen.device)[:, None, None]
    heads = torch.arange(kv_heads, device=chosen.device)[None, :, None]
    return rows, heads, chosen[:, None, :]


def _rows_of(cache: Tensor, recalled: Tensor, index: Tensor) -> Tensor:
    """Candidate rows by ``index`` [B, N]: below C a slot of ``cache`` [B, Hkv, C, D], else
    row index - C of ``recalled`` [B, Hkv, M, D]. Returns [B, Hkv, N, D]."""
    capacity = cache.shape[2]
    shape = (-1, cache.shape[1], -1, cache.shape[3])
    from_cache = cache.gather(2, index.clamp(max=capacity - 1)[:, None, :, None].expand(shape))
    late = (index - capacity).clamp(min=0)[:, None, :, None].expand(shape)
    from_recalled = recalled.gather(2, late)
    return torch.where((index < capacity)[:, None, :, None], from_cache, from_recalled)


def choose_pages(query: Tensor, pages: HostPages, recall_pages: int) -> Tensor:
    """The ``recall_pages`` pages [B, R] (page numbers, in page order) whose digest bounds
    the head-averaged q.k of ``query`` [B, Hq, D] highest (ties: the earlier page); empty
    pages only after the others."""
    dtype = score_dtype(query.dtype)
    page_held = pages.positions[:, :, 0] >= 0  # a page's rows fill its first slots
    bound = group_bounds(query.to(dtype), pages.low.to(dtype), pages.high.to(dtype))
    bound = bound.masked_fill(~page_held, -math.inf)
    count = min(recall_pages, bound.shape[1])
    # each page's rank by comparisons, not sorts (two sorts per layer and step were a
    # tenth of a host-bound step; these fuse): pages ahead of page p bound q.k higher, or
    # as high with a lower number
    number = torch.arange(bound.shape[1], device=bound.device)
    other, page = bound[:, None, :], bound[:, :, None]  # [B, p, other page]
    ahead = (other > page) | ((other == page) & (number[None, :] < number[:, None]))
    chosen = ahead.sum(-1) < count  # [B, P]
    wanted = torch.arange(count, device=bound.device).expand(bound.shape[0], -1)
    return _nth_true(chosen, wanted)  # the j-th chosen page in page order


def _nth_true(flags: Tensor, nth: Tensor) -> Tensor:
    """The index of the ``nth`` [B, M] (0-based) set flag of each row of ``flags`` [B, N];
    N where a row has fewer. The set flags' indices are written, in order, to the columns
    their running count names (a cumsum: one small kernel; counts by comparisons over N x
    N took about three times as long in a graph of such calls, 1 thread); unset flags
    write an extra column, dropped."""
    length = flags.shape[1]
    running = flags.cumsum(-1)  # set flags up to and including each
    column = torch.where(flags, running - 1, length)
    index = torch.arange(length, device=flags.device).expand_as(column)
    found = torch.full((flags.shape[0], length + 1), length, dtype=torch.long, device=flags.device)
    found = found.scatter(1, column, index)[:, :length]
    return torch.where(nth < length, found.gather(1, nth.clamp(max=length - 1)), length)


def _move_rows_in(
    keys: Tensor,
    values: Tensor,
    recalled_keys: Tensor,
    recalled_values: Tensor,
    slot: Tensor,
    row: Tensor,
    moving: Tensor,
) -> None:
    """Slot ``slot`` [B, M] of ``keys``/``values`` takes recalled row ``row`` [B, M], in
    the batch rows ``moving`` [B, 1]. At most M = R * S rows move, so only M slots are
    written (a write of the whole cache read and wrote every row at every swap). Entries
    past a row's moves repeat its last move, and a row that moves nothing rewrites a slot's
    own row, so no two writes to one slot differ."""
    batch, kv_heads, _, head_dim = keys.shape
    rows = torch.arange(batch, device=keys.device)[:, None, None]
    heads = torch.arange(kv_heads, device=keys.device)[None, :, None]
    at = (rows, heads, slot[:, None, :])  # an index_put_ Inductor writes in place
    take = row[:, None, :, None].expand(-1, kv_heads, -1, head_dim)
    for cache, recalled in ((keys, recalled_keys), (values, recalled_values)):
        new = torch.where(moving[:, :, None, None], recalled.gather(2, take), cache[at])
        cache.index_put_(at, new)


def recall_before_step(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    slots: AvlSlots,
    pages: HostPages,
    recall_pages: int,
    scale: float,
    core_pages: CorePages | None = None,
    native: bool = True,
) -> None:
    """Swap pages in for the step about to run, decided on ``query`` [B, Hq, D] (the last
    token's); writes ``keys``/``values`` [B, Hkv, C, D], ``slots`` and ``pages`` in place.
    With the query-aware core (``PagedAvlSlots``) the slots' image ordinals and
    ``core_pages`` follow the rows that moved. Fixed shapes; every batch row at once. The
    compiled decode graph's swap (a CPU's); the runtime-call route overlaps its host
    copies (``recall_copies.RecallCopies``). On a CPU, with float32 rows, the swap is one
    call of C code (``native_recall_swap``; ``native=False``: the tensor function)."""
    if native and _native_swap(query, keys, values, slots, pages, recall_pages, scale, core_pages):
        return
    chosen = choose_pages(query, pages, recall_pages)
    chosen_on_host = chosen.to(pages.keys.device)  # a read of the device on a GPU
    recalled_keys = gather_pages(pages.keys, chosen_on_host).to(keys.device, non_blocking=True)
    recalled_values = gather_pages(pages.values, chosen_on_host).to(keys.device, non_blocking=True)
    leaving_keys, leaving_values = swap_pages_in(
        query, keys, values, slots, pages, chosen, recalled_keys, recalled_values, scale,
        core_pages,
    )  # fmt: skip
    write_pages(pages.keys, chosen_on_host, leaving_keys)
    write_pages(pages.values, chosen_on_host, leaving_values)


_C_CHOICE_DIGEST_BYTES = 512 * 1024  # per batch row and layer


def _native_swap(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    slots: AvlSlots,
    pages: HostPages,
    recall_pages: int,
    scale: float,
    core_pages: CorePages | None,
) -> bool:
    """``recall_before_step`` as ``avl::recall_swap`` where its tensors allow (else False,
    and nothing done)."""
    paged = isinstance(slots, PagedAvlSlots)
    tensors = {
        "query": query, "keys": keys, "values": values, "role": slots.role,
        "position": slots.position, "last_qk": slots.last_qk,
        "page_positions": pages.positions, "page_keys": pages.keys,
        "page_values": pages.values, "page_low": pages.low, "page_high": pages.high,
        "image_ordinal": slots.image_ordinal if paged else None,
        "image_positions": core_pages.image_positions if core_pages is not None else None,
        "core_low": core_pages.low if core_pages is not None else None,
        "core_high": core_pages.high if core_pages is not None else None,
        "members": core_pages.members if core_pages is not None else None,
        "chosen": None,  # the C swap chooses the pages itself
    }  # fmt: skip
    if paged and core_pages is None:
        return False
    if why_not_native(tensors) is not None:
        return False
    # the pages to bring: the C swap's own choice reads every page's digest on one thread;
    # past about an L2's worth of digests (``cpu-long``: 2.9 MB a layer) the graph's
    # parallel, vectorized kernel reads them faster (measured: docs/history.md, session 21)
    digest_bytes = 2 * pages.low[0].numel() * pages.low.element_size()
    if digest_bytes > _C_CHOICE_DIGEST_BYTES:
        tensors["chosen"] = choose_pages(query, pages, recall_pages)
    recall_swap(*tensors.values(), recall_pages, scale)
    return True


def swap_pages_in(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    slots: AvlSlots,
    pages: HostPages,
    chosen: Tensor,
    recalled_keys: Tensor,
    recalled_values: Tensor,
    scale: float,
    core_pages: CorePages | None = None,
) -> tuple[Tensor, Tensor]:
    """The swap's device side, given the ``chosen`` pages [B, R] (on the cache's device)
    and their rows on the device (``recalled_keys``/``recalled_values`` [B, Hkv, R * S,
    D]): ranks the resident and recalled rows, writes the cache, ``slots``, ``core_pages``
    and the pages' positions and digests in place, and returns the rows that leave, page by
    page [B, Hkv, R * S, D], for the host pages' ``chosen`` pages (``write_pages``)."""
    batch, kv_heads, capacity, _ = keys.shape
    size = pages.positions.shape[2]
    recalled_positions = pages.positions.gather(1, chosen[:, :, None].expand(-1, -1, size))
    recalled_positions = recalled_positions.reshape(batch, -1)  # [B, M = R * S], -1: no row
    moves = recalled_positions.shape[1]
    # candidates: the resident image rows (every slot, flagged) and the recalled rows,
    # ranked by head-averaged q.k (the tie rule: the lower position first)
    resident = (slots.role == OTHER) | (slots.role == CORE)  # [B, C]
    recalled = recalled_positions >= 0
    positions = torch.cat([slots.position[:, 0], recalled_positions], dim=1)
    valid = torch.cat([resident, recalled], dim=1)
    # the resident rows' q.k is the last step's (``last_qk``: the step that ran this query
    # computed it for every slot; a swap moves image rows only before a step's attention)
    recalled_qk = slot_logits(query[:, :, None], recalled_keys, scale).mean(1)
    scores = torch.cat([slots.last_qk, recalled_qk], dim=1)
    # of the K + M' valid rows (K resident, M' recalled) the M' the tie rule ranks last
    # leave: one selection of M (float32-born scores), not a sort of all C + M; the
    # invalid rows score +inf, so none of them is ranked last before a valid one
    worst = last_ranked(scores.masked_fill(~valid, math.inf), positions, moves)  # [B, M]
    # the rows that leave, in rank order (ranks K ... K + M' - 1), by position fill the
    # chosen pages in page order (their sizes kept): read them before their slots are
    # written; each one's rank by position is counted among them alone
    every = torch.arange(moves, device=keys.device)
    last = capacity + moves - 1
    n_recalled = recalled.sum(1, keepdim=True)  # M'
    ranked = worst.gather(1, (n_recalled - 1 - every).clamp(min=0))
    leaving = torch.where(every < n_recalled, ranked, last + 1)  # [B, M]
    gone = torch.zeros(batch, last + 2, dtype=torch.bool, device=keys.device)
    stays = valid & ~gone.scatter(1, leaving, True)[:, :-1]
    far = torch.iinfo(torch.long).max
    leaving_position = torch.where(
        leaving <= last, positions.gather(1, leaving.clamp(max=last)), far
    )
    by_position = (leaving_position[:, None, :] < leaving_position[:, :, None]).sum(-1)
    held = recalled.view(batch, -1, size)  # [B, R, S]
    sizes = held.sum(-1)  # [B, R]
    page = torch.arange(sizes.shape[1], device=keys.device)
    starts = (sizes[:, None, :] * (page[None, :] < page[:, None])).sum(-1)  # rows before
    destination = (starts[:, :, None] + torch.arange(size, device=keys.device)).view(batch, -1)
    matches = by_position[:, None, :] == destination[:, :, None]  # [B, page slot, leaving]
    taken = torch.where(matches, leaving[:, None, :], 0).amax(-1).clamp(max=last)
    leaving_keys = _rows_of(keys, recalled_keys, taken)
    leaving_values = _rows_of(values, recalled_values, taken)
    leaving_positions = positions.gather(1, taken).masked_fill(~recalled, -1)
    # the k-th slot whose row leaves (in the order of ``leaving``) takes the k-th recalled
    # row that stays (page order); entries past a row's count repeat its last one
    freed = leaving < capacity  # [B, M]: the leaving entries that free a slot
    incoming = recalled & stays[:, capacity:]
    count = freed.sum(1, keepdim=True)  # [B, 1], as many as come in
    entry = torch.minimum(every, (count - 1).clamp(min=0))  # [B, M]
    slot = leaving.gather(1, _nth_true(freed, entry).clamp(max=moves - 1))
    slot = slot.clamp(max=capacity - 1)
    row = _nth_true(incoming, entry).clamp(max=moves - 1)
    moving = count > 0
    came = recalled_positions.gather(1, row)  # [B, M]
    if isinstance(slots, PagedAvlSlots):  # read the leaving rows' ordinals before the writes
        assert core_pages is not None, "the query-aware core needs its page boxes"
        left_ordinal = slots.image_ordinal.gather(1, slot)  # -1 only where nothing moves
        came_ordinal = image_ordinals(came, recalled.gather(1, row), core_pages.image_positions,
                                      in_graph=True).clamp(min=0)  # fmt: skip
    _move_rows_in(keys, values, recalled_keys, recalled_values, slot, row, moving)
    rows = torch.arange(batch, device=keys.device)[:, None]
    heads = torch.arange(kv_heads, device=keys.device)[None, :, None]
    at = (rows[:, :, None], heads, slot[:, None, :])
    moved_position = came[:, None, :].expand(-1, kv_heads, -1)
    slots.position.index_put_(
        at, torch.where(moving[:, :, None], moved_position, slots.position[at])
    )
    role = slots.role[rows, slot]  # it joins the core at a re-pick
    slots.role.index_put_((rows, slot), torch.where(moving, OTHER, role).to(role.dtype))
    pages.positions.index_put_((rows, chosen), leaving_positions.view(held.shape))
    shape = (batch, kv_heads, -1, size, keys.shape[3])
    low, high = box_of(leaving_keys.view(shape), held)
    at_pages = _page_index(chosen, kv_heads)
    pages.low.index_put_(at_pages, low.to(pages.low.dtype))
    pages.high.index_put_(at_pages, high.to(pages.high.dtype))
    if isinstance(slots, PagedAvlSlots):
        assert core_pages is not None
        ordinal = torch.where(moving, came_ordinal, left_ordinal)
        slots.image_ordinal.index_put_((rows, slot), ordinal)
        core_pages.move(keys, left_ordinal.clamp(min=0), came_ordinal, slot, moving)
    return leaving_keys, leaving_values
