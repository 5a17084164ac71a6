"""``avl::gathered_attention`` against a float64 reference, and the exact partial merge."""

import pytest
import torch

from avl_compile.lowering.gathered_attention import gathered_attention, merge_partial_attention

TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _reference(query, keys, values, index, scale):
    """Dense attention with a mask of the selected rows, in float64."""
    batch, q_heads, q_len, _ = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    allowed = torch.zeros(batch, kv_heads, length, dtype=torch.bool)
    rows = index.expand(batch, kv_heads, -1)
    for b in range(batch):
        for h in range(kv_heads):
            for r in rows[b, h].tolist():
                if r >= 0:
                    allowed[b, h, r] = True
    k = keys.double().repeat_interleave(group, 1)
    v = values.double().repeat_interleave(group, 1)
    logits = query.double() @ k.transpose(-1, -2) * scale
    mask = allowed.repeat_interleave(group, 1)[:, :, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, -1) @ v, torch.logsumexp(logits, -1)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("q_heads, kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("count", [1, 7, 40])
def test_matches_float64_reference(dtype, q_heads, kv_heads, shared, count):
    generator = torch.Generator().manual_seed(count + q_heads)
    batch, q_len, length, dim = 2, 1, 40, 16
    query = torch.randn(batch, q_heads, q_len, dim, generator=generator).to(dtype)
    keys = torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype)
    values = torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype)
    heads = 1 if shared else kv_heads
    index = torch.stack(
        [torch.randperm(length, generator=generator)[:count] for _ in range(batch * heads)]
    ).view(batch, heads, count)
    index[1, :, -1] = -1 if count > 1 else index[1, :, -1]  # padding entries are skipped
    out, lse = gathered_attention(query, keys, values, index, 0.25)
    expected_out, expected_lse = _reference(query, keys, values, index, 0.25)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected_out, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(lse.double(), expected_lse, atol=TOLERANCE[dtype] * 10, rtol=0)


def test_several_query_rows():
    query, keys, values = (
        torch.randn(1, 4, 3, 8),
        torch.randn(1, 2, 10, 8),
        torch.randn(1, 2, 10, 8),
    )
    index = torch.tensor([[[0, 3, 9]]])
    out, _ = gathered_attention(query, keys, values, index, 0.5)
    expected, _ = _reference(query, keys, values, index, 0.5)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=0)


def test_merge_of_disjoint_parts_equals_attention_over_their_union():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 1, 8, generator=generator, dtype=torch.float64)
    keys = torch.randn(2, 2, 30, 8, generator=generator, dtype=torch.float64)
    values = torch.randn(2, 2, 30, 8, generator=generator, dtype=torch.float64)
    image = torch.tensor([[[3, 4, 10, 11]], [[5, 6, 7, -1]]])
    text = torch.tensor([[[0, 1, 20], [0, 2, 21]], [[0, 1, 22], [0, 1, -1]]])
    merged, lse = merge_partial_attention(
        [gathered_attention(query, keys, values, i, 0.3) for i in (image, text)]
    )
    union = torch.cat([image.expand(2, 2, 4), text], dim=-1)
    expected, expected_lse = _reference(query, keys, values, union, 0.3)
    torch.testing.assert_close(merged, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=1e-12, rtol=0)


def test_a_row_with_nothing_selected_contributes_nothing_to_the_merge():
    query, keys, values = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    empty = torch.full((1, 1, 2), -1)
    out, lse = gathered_attention(query, keys, values, empty, 1.0)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    full = torch.arange(6).view(1, 1, 6)
    merged, _ = merge_partial_attention(
        [(out, lse), gathered_attention(query, keys, values, full, 1.0)]
    )
    torch.testing.assert_close(merged, gathered_attention(query, keys, values, full, 1.0)[0])


def test_empty_selection_and_out_of_range_index_are_clear_errors():
    query, keys, values = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="empty"):
        gathered_attention(query, keys, values, torch.zeros(1, 1, 0, dtype=torch.long), 1.0)
    with pytest.raises(IndexError, match="index 6 is out of range for a cache of 6 rows"):
        gathered_attention(query, keys, values, torch.tensor([[[0, 6]]]), 1.0)
    with pytest.raises(ValueError, match="int32/int64"):
        gathered_attention(query, keys, values, torch.zeros(1, 1, 2), 1.0)


def test_op_inside_an_inductor_graph():
    def attend(query, keys, values, index):
        out, lse = torch.ops.avl.gathered_attention(query * 2, keys, values, index, 0.5)
        return out + 1, lse

    args = (
        torch.randn(1, 4, 1, 8),
        torch.randn(1, 2, 12, 8),
        torch.randn(1, 2, 12, 8),
        torch.tensor([[[1, 5, 7]]]),
    )
    compiled = torch.compile(attend, backend="inductor", fullgraph=True)
    for got, expected in zip(compiled(*args), attend(*args), strict=True):
        torch.testing.assert_close(got, expected)
