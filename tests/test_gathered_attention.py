"""``avl::gathered_attention`` against a float64 reference, and the exact partial merge."""

import pytest
import torch

from avl_compile.lowering.gathered_attention import (
    check_gathered_attention_inputs,
    gathered_attention,
    merge_partial_attention,
)

TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _reference(query, keys, values, index, scale, ranges=None):
    """Dense attention with a mask of the selected rows, in float64."""
    batch, q_heads, q_len, _ = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    allowed = torch.zeros(batch, kv_heads, length, dtype=torch.bool)
    for b in range(batch):
        for h in range(kv_heads):
            if index is not None:
                for r in index.expand(batch, kv_heads, -1)[b, h].tolist():
                    if r >= 0:
                        allowed[b, h, r] = True
            if ranges is not None:
                for start, stop in ranges[b].tolist():
                    allowed[b, h, start:stop] = True
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


def random_ranges(batch, length, count, generator):
    """[B, count, 2] disjoint spans inside [0, length), some empty."""
    spans = []
    for _ in range(batch):
        cuts = torch.randperm(length + 1, generator=generator)[: 2 * count].sort().values
        pairs = cuts.view(count, 2)
        pairs[0, 1] = pairs[0, 0]  # an empty span is skipped
        spans.append(pairs)
    return torch.stack(spans)


def index_outside(ranges, length, heads, count, generator):
    """[B, heads, count] rows outside the spans (padded with -1)."""
    batch = ranges.shape[0]
    index = torch.full((batch, heads, count), -1)
    for b in range(batch):
        free = torch.ones(length, dtype=torch.bool)
        for start, stop in ranges[b].tolist():
            free[start:stop] = False
        rows = torch.nonzero(free).flatten()
        for h in range(heads):
            chosen = rows[torch.randperm(rows.numel(), generator=generator)[:count]]
            index[b, h, : chosen.numel()] = chosen
    return index


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("with_index", [True, False])
@pytest.mark.parametrize("n_ranges", [1, 3])
def test_contiguous_ranges_with_and_without_an_index(dtype, with_index, n_ranges):
    generator = torch.Generator().manual_seed(n_ranges)
    batch, length, dim = 3, 50, 16
    query = torch.randn(batch, 8, 2, dim, generator=generator).to(dtype)
    keys = torch.randn(batch, 2, length, dim, generator=generator).to(dtype)
    values = torch.randn(batch, 2, length, dim, generator=generator).to(dtype)
    ranges = random_ranges(batch, length, n_ranges + 1, generator)
    index = index_outside(ranges, length, 2, 6, generator) if with_index else None
    out, lse = gathered_attention(query, keys, values, index, 0.3, ranges)
    expected_out, expected_lse = _reference(query, keys, values, index, 0.3, ranges)
    torch.testing.assert_close(out.double(), expected_out, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(lse.double(), expected_lse, atol=TOLERANCE[dtype] * 10, rtol=0)


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
    with pytest.raises(ValueError, match="nothing selected"):
        gathered_attention(query, keys, values, None, 1.0)
    with pytest.raises(IndexError, match="outside the cache's 6 rows"):
        gathered_attention(query, keys, values, None, 1.0, torch.tensor([[[2, 7]]]))
    with pytest.raises(ValueError, match=r"ranges must be .* \[B, R, 2\]"):
        gathered_attention(query, keys, values, None, 1.0, torch.tensor([[2, 7]]))


def test_range_checks_read_no_values_when_traced():
    """The Triton op's body runs on fake tensors when Dynamo or Inductor trace it (on a GPU):
    the range check must not read them (it failed there with aten._local_scalar_dense)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    query, keys, values = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    index, ranges = torch.tensor([[[0, 6]]]), torch.tensor([[[2, 7]]])
    with pytest.raises(IndexError):  # eager: checked
        check_gathered_attention_inputs(query, keys, values, index, ranges, check_range=True)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (query, keys, values, index, ranges)]
        check_gathered_attention_inputs(*fake, check_range=True)


def test_op_inside_an_inductor_graph():
    def attend(query, keys, values, index, ranges):
        out, lse = torch.ops.avl.gathered_attention(query * 2, keys, values, index, 0.5, ranges)
        return out + 1, lse

    args = (
        torch.randn(1, 4, 1, 8),
        torch.randn(1, 2, 12, 8),
        torch.randn(1, 2, 12, 8),
        torch.tensor([[[1, 5, 7]]]),
        torch.tensor([[[8, 11]]]),
    )
    compiled = torch.compile(attend, backend="inductor", fullgraph=True)
    for got, expected in zip(compiled(*args), attend(*args), strict=True):
        torch.testing.assert_close(got, expected)


def test_pick_rows_reads_a_token_major_cache_in_place():
    """A [B, H, L, D] view of a [B, L, H, D] tensor (a prefill's keys, as projected) and a
    slice of a bigger one pick the same rows as their contiguous copies, -1 as row 0."""
    from avl_compile.lowering.gathered_attention import _row_table, pick_rows

    torch.manual_seed(3)
    token_major = torch.randn(2, 7, 3, 4).transpose(1, 2)
    sliced = torch.randn(5, 2, 7, 3, 4).transpose(2, 3)[2]
    rows = torch.randint(-1, 7, (2, 3, 6))
    for cache in (token_major, sliced):
        assert _row_table(cache) is not None  # read in place, not copied
        assert torch.equal(pick_rows(cache, rows), pick_rows(cache.contiguous(), rows))
    expected = token_major.contiguous()[0, 1, rows[0, 1].clamp(min=0)]
    assert torch.equal(pick_rows(token_major, rows)[0, 1], expected)
