"""Recall's copies between the host pages and the accelerator where a graph cannot index
host memory (a GPU's), arranged so that no step waits for them:

- the next swap's pages are chosen on the device from the query just run (nothing the swap
  reads changes before it), and their numbers start copying to the host right after the
  step (``plan_from``);
- at the refresh step the host gathers those pages into a pinned staging buffer and uploads
  them on a side stream (``fetch``); the compute stream waits for the upload only where it
  reads the rows;
- the rows that leave go back on another side stream into pinned buffers (``write_back``);
  the host writes them into its pages at the layer's next swap (``flush``), long after.

Two routes use them. Staged decode graphs (``stage_before_graph``, ``finish_after_graph``,
called by ``CompiledDecode`` around each graph): the graph chooses the pages and swaps the
uploaded rows in; the uploads of a step's layers are all issued before its graph. The
runtime-call graph (``swap_through_copies``, ``plan_next_swap``): one layer at a time, so
a layer's upload runs while the device still computes the layers before it (the host runs
ahead: nothing within a step reads the device).

The host waits on the device only for a plan or a write-back still in flight at the next
swap (after ``generate``'s per-token read of the device both are done): counted in
``host_waits``. On a CPU (the pages and the cache in one memory) every copy is immediate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avl_compile.policies.avl_decode import AvlSlots
from avl_compile.policies.page_core import CorePages
from avl_compile.policies.recall import (
    HostPages,
    RecallState,
    StagedRows,
    choose_pages,
    gather_pages,
    swap_pages_in,
    write_pages,
)


class RecallCopies:
    """One layer's host copies. ``defer_write_back``: leaving rows reach the host pages at
    the next swap, not at once (on CUDA, or a CPU test of that order)."""

    def __init__(self, device: torch.device, defer_write_back: bool) -> None:
        cuda = device.type == "cuda"
        self.device = device
        self.defer_write_back = defer_write_back
        # uploads and write-backs on streams of their own: an upload queued behind a
        # write-back would wait for the compute that write-back waits for
        self.upload = torch.cuda.Stream(device) if cuda else None
        self.download = torch.cuda.Stream(device) if cuda else None
        # the chosen pages for a layer step: (step, on the device, on the host, copy done)
        self._plan: tuple[int, Tensor, Tensor, torch.cuda.Event | None] | None = None
        # rows on their way to the host: (chosen on the host, keys, values, copy done)
        self._pending: tuple[Tensor, Tensor, Tensor, torch.cuda.Event | None] | None = None
        self.host_waits = 0

    def plan(self, step: int, query: Tensor, pages: HostPages, recall_pages: int) -> None:
        """Choose the pages of the swap at layer step ``step`` from ``query`` [B, Hq, D]."""
        self.plan_from(step, choose_pages(query, pages, recall_pages))

    def plan_from(self, step: int, chosen: Tensor) -> None:
        """The swap at ``step`` takes the ``chosen`` pages [B, R] (on the device): start
        copying their numbers to the host."""
        on_host, done = self._to_host(chosen)
        self._plan = (step, chosen, on_host, done)

    def fetch(
        self, step: int, query: Tensor, pages: HostPages, recall_pages: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The pages of the swap at ``step`` (planned, or chosen now from ``query``): their
        numbers on the device and on the host, and their keys and values on the device [B,
        Hkv, R * S, D]."""
        self.flush(pages)
        if self._plan is None or self._plan[0] != step:  # nothing planned for this step
            self.plan(step, query, pages, recall_pages)
        assert self._plan is not None
        _, chosen, on_host, done = self._plan
        self._plan = None
        self._wait(done)
        pinned = self.upload is not None
        keys = self._to_device(gather_pages(pages.keys, on_host, pinned))
        values = self._to_device(gather_pages(pages.values, on_host, pinned))
        return chosen, on_host, keys, values

    def write_back(
        self, pages: HostPages, chosen_on_host: Tensor, keys: Tensor, values: Tensor
    ) -> None:
        """Rows that leave the cache [B, Hkv, R * S, D] into the host pages' chosen pages."""
        if not self.defer_write_back:
            write_pages(pages.keys, chosen_on_host, keys)
            write_pages(pages.values, chosen_on_host, values)
            return
        keys_on_host, _ = self._to_host(keys)
        values_on_host, done = self._to_host(values)
        self._pending = (chosen_on_host, keys_on_host, values_on_host, done)

    def flush(self, pages: HostPages) -> None:
        """Write the rows on their way to the host into its pages."""
        if self._pending is None:
            return
        chosen_on_host, keys, values, done = self._pending
        self._pending = None
        self._wait(done)
        write_pages(pages.keys, chosen_on_host, keys)
        write_pages(pages.values, chosen_on_host, values)

    def take_host_waits(self) -> int:
        waits, self.host_waits = self.host_waits, 0
        return waits

    def _wait(self, done: torch.cuda.Event | None) -> None:
        if done is not None and not done.query():
            self.host_waits += 1
            done.synchronize()

    def _to_host(self, tensor: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
        stream = self.download
        if stream is None:
            return tensor.to("cpu", copy=True), None
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor is written
        with torch.cuda.stream(stream):
            on_host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            on_host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        tensor.record_stream(stream)  # not reused before the copy has read it
        return on_host, done

    def _to_device(self, on_host: Tensor) -> Tensor:
        if self.upload is None:
            return on_host.to(self.device)
        with torch.cuda.stream(self.upload):  # allocated on the upload stream, written there
            rows = on_host.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.upload)
        rows.record_stream(compute)
        return rows


def _defers_write_back(pages: HostPages, device: torch.device) -> bool:
    """Whether the host pages live in another memory than the cache (a GPU's)."""
    return pages.keys.device != device


def _copies_of(recall: RecallState) -> RecallCopies:
    """The layer's copies, made at their first use (on the device of its query)."""
    if recall.copies is None:
        device = recall.last_query.device
        recall.copies = RecallCopies(device, _defers_write_back(recall.pages, device))
    return recall.copies


def swap_through_copies(
    recall: RecallState,
    keys: Tensor,
    values: Tensor,
    slots: AvlSlots,
    recall_pages: int,
    scale: float,
    core_pages: CorePages | None,
    step: int,
) -> None:
    """``recall_before_step`` for layer step ``step`` on the runtime-call route, its copies
    through the layer's ``RecallCopies`` (made at the first swap)."""
    copies = _copies_of(recall)
    chosen, on_host, recalled_keys, recalled_values = copies.fetch(
        step, recall.last_query, recall.pages, recall_pages
    )
    leaving_keys, leaving_values = swap_pages_in(
        recall.last_query, keys, values, slots, recall.pages, chosen, recalled_keys,
        recalled_values, scale, core_pages,
    )  # fmt: skip
    copies.write_back(recall.pages, on_host, leaving_keys, leaving_values)


def plan_next_swap(recall: RecallState, step: int, recall_pages: int) -> None:
    """Right after a layer's step whose next step (``step``) is a refresh step: choose
    that swap's pages now, from the query just run (stored in ``recall.last_query``)."""
    _copies_of(recall).plan(step, recall.last_query, recall.pages, recall_pages)


def stage_before_graph(recall: RecallState, step: int, refresh: bool, recall_pages: int) -> None:
    """Before a staged decode graph runs layer step ``step``: at a refresh step, upload
    the chosen pages' rows and make the buffers for the rows that leave (``recall.staged``).
    The first time, the next swap's pages are chosen here (later, by the graphs)."""
    copies = _copies_of(recall)
    if recall.chosen is None:
        recall.chosen = choose_pages(recall.last_query, recall.pages, recall_pages)
        if refresh:
            copies.plan_from(step, recall.chosen)
    recall.staged = None
    if not refresh:
        return
    chosen, on_host, keys, values = copies.fetch(
        step, recall.last_query, recall.pages, recall_pages
    )
    if chosen is not recall.chosen:  # chosen outside the graphs (a step through runtime calls)
        recall.chosen.copy_(chosen)
    leaving_keys, leaving_values = torch.empty_like(keys), torch.empty_like(values)
    recall.staged = StagedRows(keys, values, leaving_keys, leaving_values, on_host)


def finish_after_graph(recall: RecallState, next_step: int, next_refresh: bool) -> None:
    """After a staged decode graph: the rows that left go to the host pages, and if the
    layer's next step is a refresh step, the pages the graph chose for it start their way
    to the host."""
    copies, staged = recall.copies, recall.staged
    assert copies is not None and recall.chosen is not None
    if staged is not None:
        assert staged.chosen_on_host is not None
        copies.write_back(
            recall.pages, staged.chosen_on_host, staged.leaving_keys, staged.leaving_values
        )
        recall.staged = None
    if next_refresh:
        copies.plan_from(next_step, recall.chosen)
