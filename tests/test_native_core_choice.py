"""The C choice of the query-aware core (``avl::core_choice``) against the tensor function
it replaces on a CPU (``choose_query_aware_core(native=False)``): the same roles."""

from __future__ import annotations

import pytest
import torch

from avl_compile.lowering.native_core_choice import library
from avl_compile.policies import avl_decode
from avl_compile.policies.avl_decode import (
    CORE,
    FREE,
    N_CORE,
    OTHER,
    SINK,
    TEXT,
    PagedAvlSlots,
    choose_query_aware_core,
)
from avl_compile.policies.page_core import CorePages, image_ordinals

pytestmark = pytest.mark.skipif(not library(), reason="no C compiler for the C choice")

KV_HEADS, Q_HEADS, CAPACITY = 2, 4, 30


def _state(seed: int, exact: bool, n_core: tuple[int, int], page_size: int = 3):
    """A layer mid-decode: row 0 holds 18 of its 40 image tokens, row 1 9 of 12, a sink,
    text and free slots; ``exact``: keys and query on a grid of 1/4 (bounds exact in
    float32, and pages tie)."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = 4 if exact else 8

    def draw(*shape: int) -> torch.Tensor:
        if exact:
            return torch.randint(-2, 3, shape, generator=generator).float() / 4
        return torch.randn(*shape, generator=generator)

    slots = PagedAvlSlots.empty(2, KV_HEADS, CAPACITY, torch.float32, "cpu")
    for tensor in slots.tensors():
        tensor.zero_()
    slots.role.fill_(FREE)
    slots.position.fill_(-1)
    keys = draw(2, KV_HEADS, CAPACITY, head_dim)
    image_positions = torch.full((2, 40), 10**6, dtype=torch.long)
    for b, (n_image, n_kept) in enumerate(((40, 18), (12, 9))):
        image = torch.arange(2, 2 + n_image)
        image_positions[b, :n_image] = image
        kept = image[torch.randperm(n_image, generator=generator)[:n_kept]].sort().values
        row = [(0, SINK)] + [(int(p), OTHER) for p in kept] + [(50, TEXT), (51, TEXT)]
        for slot, (position, role) in enumerate(row):
            slots.position[b, :, slot] = position
            slots.role[b, slot] = role
        core = torch.randperm(n_kept, generator=generator)[: n_kept // 3] + 1
        slots.role[b, core] = CORE
        slots.counters[b, N_CORE] = n_core[b]
    image = (slots.role == OTHER) | (slots.role == CORE)
    ordinal = image_ordinals(slots.position[:, 0], image, image_positions)
    slots.image_ordinal.copy_(ordinal)
    pages = CorePages.build(keys, ordinal, image_positions, page_size, torch.float32)
    query = draw(2, Q_HEADS, head_dim)
    return query, slots, pages


def _roles_after(query, slots, pages, native: bool) -> torch.Tensor:
    slots = PagedAvlSlots(*[t.clone() for t in slots.tensors()][:7],
                          image_ordinal=slots.image_ordinal.clone())  # fmt: skip
    choose_query_aware_core(query, slots, pages, native=native)
    return slots.role


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_core", [(6, 3), (0, 1), (18, 40)])
def test_c_choice_keeps_the_tensor_functions_roles(seed, exact, n_core):
    query, slots, pages = _state(seed, exact, n_core)
    native = _roles_after(query, slots, pages, native=True)
    assert torch.equal(native, _roles_after(query, slots, pages, native=False))
    # the core's size is the row's count (or every candidate, where it has fewer)
    candidates = ((slots.role == OTHER) | (slots.role == CORE)).sum(1)
    expected = torch.minimum(torch.tensor(n_core), candidates)
    assert torch.equal((native == CORE).sum(1), expected)
    assert torch.equal(native == SINK, slots.role == SINK)  # other roles untouched
    assert torch.equal(native == TEXT, slots.role == TEXT)


def test_the_tie_rule_keeps_the_core_then_the_lower_position():
    """Every page bounds the query alike (a zero query): the rows already in the core
    stay, then the lowest positions fill it."""
    query, slots, pages = _state(0, exact=True, n_core=(8, 4))
    query.zero_()
    native = _roles_after(query, slots, pages, native=True)
    assert torch.equal(native, _roles_after(query, slots, pages, native=False))
    for b in range(2):
        was_core = slots.role[b] == CORE
        assert bool((native[b][was_core] == CORE).all())  # 6 and 3 were in the core


@pytest.mark.parametrize("seed", range(3))
def test_bounds_from_the_graph_give_the_same_roles(monkeypatch, seed):
    """Large boxes: the graph bounds the pages and the C code takes the bounds."""
    query, slots, pages = _state(seed, exact=False, n_core=(6, 3))
    expected = _roles_after(query, slots, pages, native=False)
    monkeypatch.setattr(avl_decode, "C_BOUND_BOX_BYTES", 0)
    assert torch.equal(_roles_after(query, slots, pages, native=True), expected)


def test_a_strided_query_and_a_compiled_call_give_the_same_roles():
    query, slots, pages = _state(1, exact=False, n_core=(6, 3))
    expected = _roles_after(query, slots, pages, native=False)
    strided = query.transpose(0, 1).contiguous().transpose(0, 1)  # [B, Hq, D], not contiguous
    assert not strided.is_contiguous()
    assert torch.equal(_roles_after(strided, slots, pages, native=True), expected)
    compiled = torch.compile(_roles_after, backend="inductor", fullgraph=True)
    assert torch.equal(compiled(query, slots, pages, True), expected)
