"""One prompt's A-VL prefill layout (``avl_layout``) and its scores' masks
(``prefill_scores.LseScoring``): made once, shared by the layers, and the same scores as
the full softmax."""

import pytest
import torch

from avl_compile.options import AvlOptions
from avl_compile.policies import prefill_scores
from avl_compile.policies.avl import AvlPolicy
from avl_compile.policies.common import (
    PrefillContext,
    column_sums,
    key_is_valid,
    last_token_score,
    prefill_logits_bias,
)
from avl_compile.policies.prefill_scores import LseScoring

BATCH, Q_HEADS, KV_HEADS, LENGTH, DIM = 2, 4, 2, 30, 8


def _tensors(seed: int):
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH, KV_HEADS, LENGTH, DIM)
    query = torch.randn(BATCH, Q_HEADS, LENGTH, DIM, generator=generator, dtype=torch.float64)
    keys = torch.randn(shape, generator=generator, dtype=torch.float64)
    return query, keys, torch.randn(shape, generator=generator, dtype=torch.float64)


def _padded_causal_mask() -> torch.Tensor:
    """Row 1 left-padded by 3 tokens: an additive float mask as HF builds it."""
    allowed = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril().expand(BATCH, 1, -1, -1).clone()
    allowed[1, :, :, :3] = False
    least = torch.finfo(torch.float64).min
    return torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, least)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("filtered", [False, True])
def test_scores_from_the_lse_are_the_full_softmax_ones(masked, filtered):
    """The last rows' score and the text columns' sums from the flash kernel's log-sum-exp
    (rows that see no text column left out) equal those of the whole probability matrix."""
    query, keys, values = _tensors(0)
    attn_mask = _padded_causal_mask() if masked else None
    is_causal = not masked
    visible = None
    if filtered:  # the prefill filter hides two image keys from every row
        visible = torch.ones(BATCH, LENGTH, dtype=torch.bool)
        visible[:, [7, 9]] = False
    columns = torch.arange(20, LENGTH)  # the text after the image
    window = 3
    scoring = LseScoring.prepare(
        attn_mask, is_causal, visible, LENGTH, LENGTH, window, columns, query.dtype
    )
    assert scoring.blocks[0][0].start == 20, "rows before the first text column are left out"
    output, lse = scoring.attend(query, keys, values, DIM**-0.5)
    bias = prefill_logits_bias(attn_mask, is_causal, LENGTH, LENGTH, query.device)
    if visible is not None:
        bias = bias.masked_fill(~visible[:, None, None, :], float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=bias, scale=DIM**-0.5, enable_gqa=True
    )
    torch.testing.assert_close(output, expected)
    valid = key_is_valid(attn_mask, BATCH, LENGTH, query.device)
    torch.testing.assert_close(
        scoring.last_row_score(query, keys, lse, DIM**-0.5, valid),
        last_token_score(query, keys, bias, DIM**-0.5, window, valid),
    )
    sums = scoring.column_sums(query, keys, lse, DIM**-0.5, valid)
    full = column_sums(query, keys, bias, DIM**-0.5, valid)
    torch.testing.assert_close(sums[..., columns], full[..., columns])
    assert (sums[..., :20] == 0).all(), "columns that are not text stay 0"


@pytest.mark.parametrize("masked", [False, True])
def test_grouped_heads_attend_as_repeated_ones(masked, monkeypatch):
    """Where the flash kernel reads grouped key heads itself, output and log-sum-exp are
    bit for bit those of the heads repeated (as before, and as on a torch whose kernel
    does not)."""
    query, keys, values = _tensors(1)
    attn_mask = _padded_causal_mask() if masked else None
    columns = torch.arange(20, LENGTH)
    scoring = LseScoring.prepare(
        attn_mask, not masked, None, LENGTH, LENGTH, 1, columns, query.dtype
    )
    grouped = scoring.attend(query, keys, values, DIM**-0.5)
    monkeypatch.setattr(prefill_scores, "_kernel_reads_grouped_heads", lambda: False)
    repeated = scoring.attend(query, keys, values, DIM**-0.5)
    for g, r in zip(grouped, repeated, strict=True):
        assert torch.equal(g, r)


def test_layers_share_the_layout_of_their_filter_and_budgets():
    """The first layer makes the prompt's layout; a layer with the same budgets reads it,
    one with its own budgets (``vision_keep_layers``) makes its own."""
    query, keys, values = _tensors(1)
    image_mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    image_mask[:, 4:20] = True
    context = PrefillContext(image_mask=image_mask)
    options = AvlOptions(text_min_budget=2, vision_keep_layers=(0.5, 0.5, 0.25))
    states = []
    for layer in range(3):
        *_, state = AvlPolicy(options, layer).prefill(
            query, keys, values, None, True, DIM**-0.5, context
        )
        states.append(state)
    assert len(context.layouts) == 2
    kept = [int((s.slots.position[0, 0] >= 0).sum()) for s in states]
    assert kept[0] == kept[1] > kept[2]
    # each layer's state tensors are its own (decode steps write them in place)
    assert states[0].slots.role.data_ptr() != states[1].slots.role.data_ptr()
    assert states[0].slots.counters.data_ptr() != states[1].slots.counters.data_ptr()


def test_a_layer_with_another_mask_gets_its_own_layout():
    """Sliding-window layers (Gemma 3) get another mask than full-attention ones: their
    attention and scores follow their own mask, not the first layer's."""
    query, keys, values = _tensors(2)
    image_mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    image_mask[:, 4:20] = True
    context = PrefillContext(image_mask=image_mask)
    full = _padded_causal_mask()
    window = full.clone()
    window[..., torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril(-6)] = full.min()
    options = AvlOptions(text_min_budget=2)
    outputs = [
        AvlPolicy(options, layer).prefill(query, keys, values, mask, False, DIM**-0.5, context)[0]
        for layer, mask in enumerate((full, window))
    ]
    assert len(context.layouts) == 2
    for output, mask in zip(outputs, (full, window), strict=True):
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=DIM**-0.5, enable_gqa=True
        )
        torch.testing.assert_close(output[1, :, 3:], expected[1, :, 3:])
        torch.testing.assert_close(output[0], expected[0])
