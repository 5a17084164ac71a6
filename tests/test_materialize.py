"""``lowering.materialize``: a rotated query read by a reduction over many key rows is
computed once, not again inside the reduction's loop."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from avl_compile.lowering.materialize import _FORCE_STRIDE, materialized

ROWS = 1537  # a loop bound no other dimension of the graph has


def _rotated_scores(query: torch.Tensor, keys: torch.Tensor, angle: torch.Tensor, hint: bool):
    """A one-row q.k (a reduction on a CPU) of a query rotated as RoPE does."""
    half = query.shape[-1] // 2
    rotated = torch.cat([-query[..., half:], query[..., :half]], dim=-1)
    query = query * angle.cos() + rotated * angle.sin()
    if hint:
        query = materialized(query)
    return torch.matmul(query, keys.transpose(-1, -2))


def _loop_nests_with_cos_over_the_rows(code: str) -> int:
    """Loop nests (each opens with an x0 loop) of the generated C++ that compute a cos
    inside a loop over the key rows."""
    nests = code.split("for(int64_t x0=")[1:]
    return sum(".cos()" in nest and f"{ROWS}L" in nest for nest in nests)


@pytest.mark.skipif(_FORCE_STRIDE is None, reason="this torch has no force_stride_order prim")
def test_the_rotation_is_computed_once_and_the_values_are_unchanged():
    torch.manual_seed(0)
    query, keys = torch.randn(4, 1, 64), torch.randn(4, ROWS, 64)
    angle = torch.linspace(0, 3, 64)
    expected = _rotated_scores(query, keys, angle, hint=False)
    assert torch.equal(_rotated_scores(query, keys, angle, hint=True), expected)
    counts = {}
    for hint in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(lambda q, k, a, h=hint: _rotated_scores(q, k, a, h))
        got, (code,) = run_and_get_code(compiled, query, keys, angle)
        torch.testing.assert_close(got, expected)
        counts[hint] = _loop_nests_with_cos_over_the_rows(code)
    assert counts == {False: 1, True: 0}  # the hint is what moves the cos out


def test_eager_mode_gets_the_tensor_itself():
    """Nothing recomputes a tensor in eager mode: no copy (whatever its strides: a prefill's
    last query row is a view of a [B, L, H, D] projection)."""
    query = torch.randn(2, 7, 4, 16).transpose(1, 2)[:, :, -1:]  # [B, H, 1, D], strided
    grouped = query.reshape(2, 2, 2, 16)
    assert materialized(grouped) is grouped


@pytest.mark.skipif(_FORCE_STRIDE is None, reason="this torch has no force_stride_order prim")
@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_a_sliced_view_is_materialized_densely(inner):
    """A view with gaps (the last row of a prompt's query, regrouped by kv head) run by a
    graph that executes the prim itself (aot_eager) as well as by Inductor."""

    def last_row_grouped(query: torch.Tensor) -> torch.Tensor:
        last = query[:, :, -1:].reshape(query.shape[0], 2, 2, query.shape[-1])
        return materialized(last) * 2

    query = torch.randn(1, 4, 9, 16)
    got = torch.compile(last_row_grouped, backend=inner, fullgraph=True)(query)
    torch.testing.assert_close(got, query[:, :, -1].reshape(1, 2, 2, 16) * 2)
