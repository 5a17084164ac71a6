"""The Triton kernel of gathered attention against a float64 reference.

On this CPU machine it runs under TRITON_INTERPRET=1 (set by conftest); on a GPU natively.
"""

import pytest
import torch
from test_gathered_attention import _reference, index_outside, random_ranges

pytest.importorskip("triton")

from avl_compile.lowering.triton_gathered_attention import (  # noqa: E402
    gathered_attention_triton,
    interpreting,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreting(), reason="no GPU and TRITON_INTERPRET is not set"
)
# fp32 runs with IEEE dot products; half types accumulate in fp32 but round p and the output
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _case(dtype, q_heads, kv_heads, q_len, head_dim, count, shared, length=150, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, q_heads, q_len, head_dim, generator=generator)
    keys = torch.randn(2, kv_heads, length, head_dim, generator=generator)
    values = torch.randn(2, kv_heads, length, head_dim, generator=generator)
    heads = 1 if shared else kv_heads
    index = torch.stack(
        [torch.randperm(length, generator=generator)[:count] for _ in range(2 * heads)]
    ).view(2, heads, count)
    if count > 2:
        index[1, :, -2:] = -1  # padding entries
    to = dict(device=DEVICE)
    return (query.to(dtype=dtype, **to), keys.to(dtype=dtype, **to),
            values.to(dtype=dtype, **to), index.to(**to))  # fmt: skip


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("q_heads, kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("count", [1, 7, 130])  # 130 spans several blocks of 64 rows
@pytest.mark.parametrize("shared", [True, False])
def test_kernel_matches_float64_reference(dtype, q_heads, kv_heads, count, shared):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip(
            "the Triton interpreter has no bfloat16 (numpy lacks it); it runs on GPU machines"
        )
    query, keys, values, index = _case(dtype, q_heads, kv_heads, 1, 32, count, shared)
    out, lse = gathered_attention_triton(query, keys, values, index, 0.2)
    expected_out, expected_lse = _reference(query.cpu(), keys.cpu(), values.cpu(), index.cpu(), 0.2)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), expected_out, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=1e-4, rtol=0)


@pytest.mark.parametrize("q_len, head_dim", [(3, 24), (2, 128)])
def test_several_query_rows_and_head_sizes(q_len, head_dim):
    query, keys, values, index = _case(torch.float32, 6, 2, q_len, head_dim, 40, False)
    out, lse = gathered_attention_triton(query, keys, values, index, head_dim**-0.5)
    expected_out, expected_lse = _reference(
        query.cpu(), keys.cpu(), values.cpu(), index.cpu(), head_dim**-0.5
    )
    torch.testing.assert_close(out.cpu().double(), expected_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_index", [True, False])
def test_kernel_with_contiguous_ranges(dtype, with_index):
    generator = torch.Generator().manual_seed(3)
    batch, length, dim = 2, 200, 32  # spans of up to 200 rows cross several blocks of 64
    query = torch.randn(batch, 8, 1, dim, generator=generator)
    keys = torch.randn(batch, 2, length, dim, generator=generator)
    values = torch.randn(batch, 2, length, dim, generator=generator)
    ranges = random_ranges(batch, length, 3, generator)
    index = index_outside(ranges, length, 2, 20, generator) if with_index else None
    to = dict(device=DEVICE)
    out, lse = gathered_attention_triton(
        query.to(dtype=dtype, **to), keys.to(dtype=dtype, **to), values.to(dtype=dtype, **to),
        None if index is None else index.to(**to), 0.2, ranges.to(**to),
    )  # fmt: skip
    expected_out, expected_lse = _reference(
        query.to(dtype), keys.to(dtype), values.to(dtype), index, 0.2, ranges
    )
    torch.testing.assert_close(out.cpu().double(), expected_out, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=1e-4, rtol=0)


def test_all_padding_row_gives_zero_output_and_minus_infinite_lse():
    query, keys, values, index = _case(torch.float32, 4, 2, 1, 16, 5, True)
    index[0] = -1
    out, lse = gathered_attention_triton(query, keys, values, index, 1.0)
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    assert torch.isinf(lse[0]).all() and torch.isfinite(lse[1]).all()


def test_errors_are_clear():
    query, keys, values, index = _case(torch.float32, 4, 2, 1, 16, 5, True)
    with pytest.raises(IndexError, match="out of range"):
        gathered_attention_triton(query, keys, values, index + 1000, 1.0)
    with pytest.raises(ValueError, match="empty"):
        gathered_attention_triton(query, keys, values, index[..., :0], 1.0)
    with pytest.raises(TypeError, match="float64"):
        gathered_attention_triton(query.double(), keys.double(), values.double(), index, 1.0)


@pytest.mark.skipif(DEVICE == "cpu", reason="Inductor schedules Triton kernels on GPUs only")
def test_kernel_inside_an_inductor_graph():
    query, keys, values, index = _case(torch.float16, 8, 2, 1, 64, 100, True)

    def attend(query, keys, values, index):
        out, lse = torch.ops.avl.gathered_attention_triton(query * 2, keys, values, index, 0.1)
        return out + 1, lse

    compiled = torch.compile(attend, backend="inductor", fullgraph=True)
    for got, expected in zip(compiled(query, keys, values, index),
                             attend(query, keys, values, index), strict=True):  # fmt: skip
        torch.testing.assert_close(got, expected, atol=4e-3, rtol=0)


@pytest.mark.parametrize("options", [{"vision_keep": 1.0, "vision_compute": 1.0, "text_keep": 1.0},
                                     {}])  # fmt: skip
def test_the_backend_decodes_through_the_kernel(monkeypatch, options):
    from helpers import compiled_greedy, greedy

    from avl_compile.tiny_models import llava_prompt, tiny_llava

    def on_device():  # the kernel runs where the cache is: on a GPU natively
        return tiny_llava().to(DEVICE)

    prompt = llava_prompt(tiny_llava(), [[1, 5, 6]], [[7, 8, 9]])
    inputs = {name: tensor.to(DEVICE) for name, tensor in prompt.inputs.items()}
    options = {**options, "inner": "eager"}
    if options.get("vision_keep") == 1.0:
        expected = greedy(on_device(), inputs, new_tokens=16).sequences
    else:
        monkeypatch.setenv("AVL_GATHERED_ATTENTION", "torch")
        expected = compiled_greedy(on_device, inputs, options, 16)[1].sequences
        torch._dynamo.reset()
    calls = []
    import avl_compile.lowering.slot_attention as slot_attention

    original = slot_attention._slot_attention_triton
    monkeypatch.setattr(
        slot_attention, "_slot_attention_triton", lambda *a: calls.append(1) or original(*a)
    )
    monkeypatch.setenv("AVL_GATHERED_ATTENTION", "triton")
    _, got = compiled_greedy(on_device, inputs, options, 16)
    assert calls, "the kernel was not used"
    assert torch.equal(got.sequences, expected)
