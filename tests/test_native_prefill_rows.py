"""``avl::prefill_rows``, the prefill's selection in C, against the tensor function it stands
for (``scored_prefill_rows``, op by op): the same rows, pages and state for every option set
the selection reads, padded batches, score windows, grouped heads, ties and text within its
budget; and the prefill takes it where the compiled selection ran before."""

from __future__ import annotations

import pytest
import torch
from helpers import PREFILL_OPTION_SETS

from avl_compile.lowering import native_build
from avl_compile.options import AvlOptions
from avl_compile.policies import avl as avl_policy
from avl_compile.policies.avl import AvlPolicy
from avl_compile.policies.avl_prefill_rows import (
    RowPlan,
    native_selection,
    scored_prefill_rows,
    why_not_native,
)
from avl_compile.policies.common import PrefillContext

pytestmark = pytest.mark.skipif(
    not native_build.KERNELS.loaded(), reason="no C/C++ compiler for the C kernels"
)

SCALE = 0.25
OPTION_SETS = {
    **PREFILL_OPTION_SETS,
    "a-vl, every step": {"refresh_every": -1},
    "core pages": {"core_page_size": 3, "refresh_every": 1},
}


def _prompt(length: int, padded: bool, head_dim: int, q_heads: int, tied: bool):
    generator = torch.Generator().manual_seed(length + 7 * padded + head_dim + q_heads)
    batch = 2
    query = torch.randn(batch, length, q_heads, head_dim, generator=generator).transpose(1, 2)
    # [B, H, L, D] views of [B, L, H, D] projections, as the prefill hands them over
    keys = torch.randn(batch, length, 2, head_dim, generator=generator).transpose(1, 2)
    values = torch.randn(batch, length, 2, head_dim, generator=generator).transpose(1, 2)
    if tied:  # keys on a coarse grid: many equal scores, the tie rule decides
        keys = (keys * 2).round() / 2  # (elementwise: the same strides)
        query = (query * 2).round() / 2
    image_mask = torch.zeros(batch, length, dtype=torch.bool)
    image_mask[0, 4 : length - 20] = True
    image_mask[1, 2 : length - 14] = True
    attn_mask, is_causal = None, True
    if padded:  # row 1 left-padded by two tokens: no sink, padding rows see nothing
        valid = torch.ones(batch, length, dtype=torch.bool)
        valid[1, :2] = False
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        attn_mask, is_causal = causal & valid[:, None, None, :], False
    return query, keys, values, attn_mask, is_causal, PrefillContext(image_mask=image_mask)


def _assert_same_rows(got, want) -> None:
    for field, expected in want._asdict().items():
        if field == "state_copies":  # the C op's alone (_assert_own_copies)
            continue
        value = getattr(got, field)
        if expected is None:
            assert value is None, field
            continue
        pairs = (
            zip(value, expected, strict=True)
            if isinstance(expected, tuple)
            else [(value, expected)]
        )
        for g, e in pairs:
            assert g.shape == e.shape and g.dtype == e.dtype, field
            if field in ("text_score", "last_qk"):  # sums in another order
                torch.testing.assert_close(g, e, msg=field)
            else:
                assert torch.equal(g, e), field


def _assert_own_copies(copies, layout, query) -> None:
    """The state's copies: the layout's values and the last query row, each in memory of
    its own (the decode writes them in place; the layout is shared by the layers)."""
    last_row = query[:, :, -1]
    expected = (layout.role, layout.counters, layout.text_options, last_row)
    for got, want in zip(copies, expected, strict=True):
        assert torch.equal(got, want) and got.dtype == want.dtype
        assert got.is_contiguous()
        assert got.untyped_storage().data_ptr() != want.untyped_storage().data_ptr()
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size()


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize(
    "padded, window, head_dim, q_heads, tied",
    [
        (False, 1, 16, 4, False),
        (True, 1, 16, 4, False),
        (True, 3, 12, 2, False),  # a window of three rows, 12-wide heads, no grouping
        (False, 1, 16, 4, True),
    ],
    ids=["plain", "padded", "window", "ties"],
)
def test_the_c_selection_keeps_the_tensor_functions_rows(
    name, padded, window, head_dim, q_heads, tied
):
    for text_keep in (0.2, 1.0):  # over its budget (H2O's keep), and within it
        options = AvlOptions(
            text_min_budget=4, text_keep=text_keep, score_window=window, **OPTION_SETS[name]
        )
        plan = RowPlan.of(options)
        for length in (60, 71):
            query, keys, values, attn_mask, is_causal, context = _prompt(
                length, padded, head_dim, q_heads, tied
            )
            layout = AvlPolicy(options, 0)._layout(query, keys, attn_mask, is_causal, context)
            assert layout.scoring is not None
            _, lse = layout.scoring.attend(query, keys, values, SCALE)
            assert not keys.is_contiguous()  # read in place
            assert why_not_native(query, keys, values, lse, layout) is None
            arguments = (query, keys, values, lse, SCALE, layout, plan)
            rows = native_selection(*arguments)
            _assert_same_rows(rows, scored_prefill_rows(*arguments))
            _assert_own_copies(rows.state_copies, layout, query)


@pytest.mark.parametrize("name", ["recall + pages", "core pages"])
def test_the_c_selection_writes_the_same_rows_on_one_thread_and_on_several(name):
    """The batch rows, then every (batch row, kv head), are split among torch's threads:
    each writes only its own outputs, so any thread count gives the same bytes."""
    options = AvlOptions(text_min_budget=4, text_keep=0.2, **OPTION_SETS[name])
    query, keys, values, attn_mask, is_causal, context = _prompt(71, True, 16, 4, False)
    layout = AvlPolicy(options, 0)._layout(query, keys, attn_mask, is_causal, context)
    _, lse = layout.scoring.attend(query, keys, values, SCALE)
    arguments = (query, keys, values, lse, SCALE, layout, RowPlan.of(options))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = native_selection(*arguments)
        torch.set_num_threads(3)  # uneven: 2 batch rows, 4 (row, head) pairs
        shared = native_selection(*arguments)
    finally:
        torch.set_num_threads(threads)
    for field, value in alone._asdict().items():
        flat = value if isinstance(value, tuple) else (value,)
        other = getattr(shared, field)
        for got, want in zip(other if isinstance(other, tuple) else (other,), flat, strict=True):
            assert (got is None and want is None) or torch.equal(got, want), field


def test_the_prefill_filter_and_other_dtypes_stay_with_the_tensor_function():
    query, keys, values, _, _, context = _prompt(60, False, 16, 4, False)
    options = AvlOptions(text_min_budget=4)
    layout = AvlPolicy(options, 0)._layout(query, keys, None, True, context)
    _, lse = layout.scoring.attend(query, keys, values, SCALE)
    half = (query.double(), keys.double(), values.double(), lse.double())
    assert "float64, not torch.float32" in why_not_native(*half, layout)
    layout.candidates[0] = layout.candidates[0][1:]  # as the prefill filter's survivors
    assert why_not_native(query, keys, values, lse, layout) == "the prefill filter is on"


def test_the_layout_keeps_each_signatures_answer_for_its_other_layers():
    query, keys, values, _, _, context = _prompt(60, False, 16, 4, False)
    layout = AvlPolicy(AvlOptions(text_min_budget=4), 0)._layout(query, keys, None, True, context)
    _, lse = layout.scoring.attend(query, keys, values, SCALE)
    assert why_not_native(query, keys, values, lse, layout) is None
    across = keys.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values and shape
    reason = why_not_native(query, across, values, lse, layout)
    assert reason == "keys's last dimension is not contiguous"
    assert len(layout.native_reasons) == 2
    assert why_not_native(query, keys.clone(), values, lse, layout) is None


@pytest.mark.parametrize("inner", ["inductor", "eager"])
def test_the_prefill_selects_in_c_where_inductor_is_the_inner_compiler(monkeypatch, inner):
    """With Inductor as the inner compiler a CPU prefill selects through the C op (the
    compiled selection is not made); with another inner compiler, op by op."""
    called = []
    monkeypatch.setattr(avl_policy, "compiled_prefill_rows", lambda: called.append("compiled"))
    real = avl_policy.native_selection
    monkeypatch.setattr(avl_policy, "native_selection", lambda *a: called.append("c") or real(*a))
    query, keys, values, _, _, context = _prompt(60, False, 16, 4, False)
    options = AvlOptions(text_min_budget=4, inner=inner, **OPTION_SETS["recall + pages"])
    AvlPolicy(options, 0).prefill(query, keys, values, None, True, SCALE, context)
    assert called == (["c"] if inner == "inductor" else [])
