"""The C swap (``avl::recall_swap``) against the tensor function it replaces on a CPU
(``recall_before_step(native=False)``): the same state after each swap."""

from __future__ import annotations

import pytest
import torch

from avl_compile.lowering.native_recall_swap import library, why_not_native
from avl_compile.policies import recall
from avl_compile.policies.avl_decode import CORE, FREE, OTHER, SINK, TEXT, AvlSlots, PagedAvlSlots
from avl_compile.policies.page_core import CorePages, image_ordinals
from avl_compile.policies.recall import HostPages, build_pages, recall_before_step

pytestmark = pytest.mark.skipif(not library(), reason="no C compiler for the C swap")

KV_HEADS, Q_HEADS = 2, 4


def _state(seed: int, paged: bool, exact: bool, page_size: int = 4, core_size: int = 3):
    """A layer after prefill: row 0 keeps 14 of its 40 image tokens, row 1 (10 image
    tokens) 7; the rest wait in host pages. ``exact``: keys and scores on a grid of 1/4
    (every q.k exact in float32, and many ties)."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = 4 if exact else 8
    image_counts, kept_counts, capacity, length = (40, 10), (14, 7), 24, 50

    def draw(*shape: int) -> torch.Tensor:
        if exact:
            return torch.randint(-3, 4, shape, generator=generator).float() / 4
        return torch.randn(*shape, generator=generator)

    all_keys, all_values = draw(2, KV_HEADS, length, head_dim), draw(2, KV_HEADS, length, head_dim)
    slots = (PagedAvlSlots if paged else AvlSlots).empty(2, KV_HEADS, capacity, torch.float32,
                                                          "cpu")  # fmt: skip
    for tensor in slots.tensors():
        tensor.zero_()
    slots.role.fill_(FREE)
    slots.position.fill_(-1)
    slots.last_qk.copy_(draw(2, capacity))
    keys = torch.zeros(2, KV_HEADS, capacity, head_dim)
    values = torch.zeros_like(keys)
    image_positions = torch.full((2, max(image_counts)), 10**6, dtype=torch.long)
    evicted = []
    for b, (n_image, n_kept) in enumerate(zip(image_counts, kept_counts, strict=True)):
        image = torch.arange(3, 3 + n_image)
        image_positions[b, :n_image] = image
        order = torch.randperm(n_image, generator=generator)
        kept = image[order[:n_kept]].sort().values
        evicted.append(image[order[n_kept:]].sort().values)
        row = [(0, SINK)] + [(int(p), OTHER) for p in kept] + [(45, TEXT), (46, TEXT)]
        for slot, (position, role) in enumerate(row):
            slots.position[b, :, slot] = position
            slots.role[b, slot] = role
            keys[b, :, slot] = all_keys[b, :, position]
            values[b, :, slot] = all_values[b, :, position]
        core = torch.randperm(n_kept, generator=generator)[: n_kept // 3] + 1
        slots.role[b, core] = CORE
    core_pages = None
    if paged:
        image = (slots.role == OTHER) | (slots.role == CORE)
        ordinal = image_ordinals(slots.position[:, 0], image, image_positions)
        slots.image_ordinal.copy_(ordinal)
        core_pages = CorePages.build(keys, ordinal, image_positions, core_size, torch.float32)
    pages = build_pages(all_keys, all_values, evicted, page_size)
    return keys, values, slots, pages, core_pages, draw


def _copy(state):
    keys, values, slots, pages, core_pages, _ = state
    slots = type(slots)(*[t.clone() for t in slots.tensors()][:7], **(
        {"image_ordinal": slots.image_ordinal.clone()} if isinstance(slots, PagedAvlSlots) else {}
    ))  # fmt: skip
    pages = HostPages(*[t.clone() for t in (pages.positions, pages.keys, pages.values,
                                              pages.low, pages.high)])  # fmt: skip
    if core_pages is not None:
        core_pages = CorePages(*[t.clone() for t in core_pages.tensors()])
    return keys.clone(), values.clone(), slots, pages, core_pages


def _assert_same(got, expected) -> None:
    keys, values, slots, pages, core_pages = got
    keys_e, values_e, slots_e, pages_e, core_e = expected
    assert torch.equal(keys, keys_e) and torch.equal(values, values_e)
    names = ("role", "position", "text_rank", "text_score", "counters", "text_options",
             "last_qk", "image_ordinal")[: len(slots.tensors())]  # fmt: skip
    for name, a, b in zip(names, slots.tensors(), slots_e.tensors(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(pages.positions, pages_e.positions)
    assert torch.equal(pages.low, pages_e.low) and torch.equal(pages.high, pages_e.high)
    # a page's empty slots hold whatever: only rows the positions name are read
    held = (pages.positions >= 0)[:, None, :, :, None].expand_as(pages.keys)
    assert torch.equal(pages.keys[held], pages_e.keys[held])
    assert torch.equal(pages.values[held], pages_e.values[held])
    if core_pages is not None:
        for name, a, b in zip(CorePages.NAMES, core_pages.tensors(), core_e.tensors(),
                              strict=True):  # fmt: skip
            assert torch.equal(a, b), name


@pytest.mark.parametrize("paged", [False, True], ids=["recall", "recall+core"])
@pytest.mark.parametrize("exact", [True, False], ids=["ties", "randn"])
@pytest.mark.parametrize("recall_pages", [2, 3, 20])
@pytest.mark.parametrize("chooser", ["c", "tensor"])
def test_the_c_swap_leaves_the_state_the_tensor_swap_leaves(
    monkeypatch, paged, exact, recall_pages, chooser
):
    """Three swaps in a row (new queries and last q.k each time), both routes from the
    same state: the cache, the slots, the host pages' held rows and digests, and the core's
    boxes and members are equal. ``ties``: scores on a grid, so the tie rule decides;
    20 pages: more than row 0 has (10 pages of 4), and row 1 has 2 pages and 4 empty ones.
    ``tensor``: the pages chosen by the tensor function, as for large digests."""
    if chooser == "tensor":
        monkeypatch.setattr(recall, "_C_CHOICE_DIGEST_BYTES", 0)
    state = _state(0, paged, exact)
    draw = state[5]
    native, plain = _copy(state), _copy(state)
    scale = 0.5 if exact else 8**-0.5
    moved = 0
    for _ in range(3):
        query = draw(2, Q_HEADS, state[0].shape[-1])
        last_qk = draw(2, state[0].shape[2])
        for route in (native, plain):
            route[2].last_qk.copy_(last_qk)
        before = plain[2].position.clone()
        for route, use_native in ((native, True), (plain, False)):
            keys, values, slots, pages, core_pages = route
            recall_before_step(query, keys, values, slots, pages, recall_pages, scale,
                               core_pages, native=use_native)  # fmt: skip
        _assert_same(native, plain)
        moved += int((plain[2].position != before).sum())
    assert moved > 0  # the swaps brought rows back


@pytest.mark.parametrize("threads", [1, 2])
def test_the_c_swap_on_any_thread_count_leaves_the_tensor_swaps_state(threads):
    """The kv heads' row copies and boxes run on torch's intra-op threads (one: inline)."""
    state = _state(3, True, False)
    native, plain = _copy(state), _copy(state)
    query = state[5](2, Q_HEADS, 8)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        recall_before_step(query, *native[:4], 3, 8**-0.5, native[4])
    finally:
        torch.set_num_threads(previous)
    recall_before_step(query, *plain[:4], 3, 8**-0.5, plain[4], native=False)
    _assert_same(native, plain)


def test_the_c_swap_is_taken_only_for_float32_rows_on_the_cpu():
    keys, values, slots, pages, core_pages, _ = _state(1, True, False)
    tensors = {"keys": keys, "last_qk": slots.last_qk, "role": slots.role,
               "members": core_pages.members}  # fmt: skip
    assert why_not_native(tensors) is None
    assert "keys is torch.float64" in why_not_native({**tensors, "keys": keys.double()})
    assert "not contiguous" in why_not_native({**tensors, "keys": keys.transpose(2, 3)})
    assert "role is torch.int64" in why_not_native({**tensors, "role": slots.role.long()})


def test_the_c_swap_runs_in_a_compiled_graph_in_place():
    """Called from a compiled function the op writes the graph's inputs themselves (no
    copy of the cache or the pages), with the tensor route's result."""
    state = _state(2, True, False)
    plain = _copy(state)
    native = _copy(state)
    query = state[5](2, Q_HEADS, 8)
    keys, values, slots, pages, core_pages = native
    keys_address = keys.data_ptr()

    def swap(query, keys, values, slots_tensors, page_tensors, core_tensors):
        slots = PagedAvlSlots(*slots_tensors[:7], image_ordinal=slots_tensors[7])
        recall_before_step(query, keys, values, slots, HostPages(*page_tensors), 3, 8**-0.5,
                           CorePages(*core_tensors))  # fmt: skip

    page_tensors = (pages.positions, pages.keys, pages.values, pages.low, pages.high)
    torch.compile(swap, fullgraph=True)(query, keys, values, slots.tensors(), page_tensors,
                                         core_pages.tensors())  # fmt: skip
    recall_before_step(query, *plain[:4], 3, 8**-0.5, plain[4], native=False)
    assert keys.data_ptr() == keys_address
    _assert_same(native, plain)
