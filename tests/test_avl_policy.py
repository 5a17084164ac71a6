"""The A-VL policy's cache layout at one attention site, step by step, on random tensors.

The end-to-end oracles compare generated tokens; these check the layout itself: every
occupied slot holds the K/V row of the token its position names (through swaps, trims and
re-allocations), the parts sit where the state says, decode attends exactly sink + core +
text (everything at a refresh), and tokens are written in place."""

import pytest
import torch

from avl_compile.options import AvlOptions
from avl_compile.policies.avl import AvlPolicy, LayerCacheState, spare_slots
from avl_compile.policies.budgets import fraction_count, text_budget
from avl_compile.policies.common import PrefillContext

BATCH, Q_HEADS, KV_HEADS, DIM = 2, 4, 2, 8
PROMPT = 40
# the rows differ (sink length, image count) so that per-row part boundaries differ
FIRST_IMAGE, N_IMAGES = [3, 5], [28, 24]


def _prompt(seed: int):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, Q_HEADS, PROMPT, DIM, generator=generator, dtype=torch.float64)
    keys = torch.randn(BATCH, KV_HEADS, PROMPT, DIM, generator=generator, dtype=torch.float64)
    values = torch.randn_like(keys)
    image_mask = torch.zeros(BATCH, PROMPT, dtype=torch.bool)
    for b in range(BATCH):
        image_mask[b, FIRST_IMAGE[b] : FIRST_IMAGE[b] + N_IMAGES[b]] = True
    return generator, query, keys, values, PrefillContext(image_mask=image_mask)


def _check_layout(state: LayerCacheState, keys, values, all_keys, all_values, image_mask):
    for b in range(BATCH):
        o, c, t, e = (
            state.others_end[b],
            state.core_start[b],
            state.text_start[b],
            state.text_end[b],
        )
        for h in range(KV_HEADS):
            position = state.position[b, h]
            assert (position[e:] == -1).all(), "free slots hold no token"
            occupied = position[:e]
            assert torch.equal(keys[b, h, :e], all_keys[b, h, occupied])
            assert torch.equal(values[b, h, :e], all_values[b, h, occupied])
            is_image = image_mask[b, occupied]
            assert is_image[:o].all() and is_image[c:t].all(), "image parts hold image rows"
            assert torch.equal(occupied[o:c], torch.arange(FIRST_IMAGE[b])), "the sink"
            text = occupied[t:e]
            assert not is_image[t:e].any() and (text >= FIRST_IMAGE[b]).all()
            assert (text[1:] > text[:-1]).all(), "kept text stays in positional order"
            assert len(set(occupied.tolist())) == e, "no token twice"


@pytest.mark.parametrize("refresh_every", [3, -1])
def test_decode_keeps_the_layout_and_attends_sink_core_and_text(refresh_every):
    options = AvlOptions(text_min_budget=4, refresh_every=refresh_every)
    policy = AvlPolicy(options, layer_idx=0)
    generator, query, keys, values, context = _prompt(seed=0)
    scale = DIM**-0.5
    _, cache_keys, cache_values, state = policy.prefill(
        query, keys, values, None, True, scale, context
    )
    image_mask = torch.cat([context.image_mask, torch.zeros(BATCH, 60, dtype=torch.bool)], 1)
    all_keys, all_values = keys, values
    _check_layout(state, cache_keys, cache_values, all_keys, all_values, image_mask)
    for b in range(BATCH):
        n_core = fraction_count(options.vision_compute, N_IMAGES[b])
        n_secondary = fraction_count(options.vision_keep, N_IMAGES[b])
        assert state.text_start[b] - state.core_start[b] == n_core
        assert state.others_end[b] == n_secondary - n_core
        assert state.core_start[b] - state.others_end[b] == FIRST_IMAGE[b]

    reallocations = 0
    for step in range(1, 41):
        new_q = torch.randn(BATCH, Q_HEADS, 1, DIM, generator=generator, dtype=torch.float64)
        new_k = torch.randn(BATCH, KV_HEADS, 1, DIM, generator=generator, dtype=torch.float64)
        new_v = torch.randn_like(new_k)
        all_keys, all_values = torch.cat([all_keys, new_k], 2), torch.cat([all_values, new_v], 2)
        before = cache_keys
        start = [0] * BATCH if refresh_every == -1 or step % 3 == 0 else list(state.others_end)
        # rows attended: the state's view before the step, plus the new token
        attended = [
            state.position[b, 0, start[b] : state.text_end[b]].tolist() + [PROMPT + step - 1]
            for b in range(BATCH)
        ]
        text_views = [
            [state.position[b, h, state.text_start[b] : state.text_end[b]].tolist()
             for h in range(KV_HEADS)]
            for b in range(BATCH)
        ]  # fmt: skip
        output, cache_keys, cache_values = policy.decode(
            new_q, before, new_k, cache_values, new_v, scale, state
        )
        reallocations += cache_keys is not before
        _check_layout(state, cache_keys, cache_values, all_keys, all_values, image_mask)
        for b in range(BATCH):
            for h in range(KV_HEADS):
                # image and sink rows are shared by the heads, text is per kv head
                rows = [p for p in attended[b] if p not in text_views[b][0]]
                rows = sorted(set(rows + text_views[b][h]) | {PROMPT + step - 1})
                k, v = all_keys[b, h, rows], all_values[b, h, rows]
                for g in range(Q_HEADS // KV_HEADS):
                    q = new_q[b, h * (Q_HEADS // KV_HEADS) + g, 0]
                    expected = torch.softmax(k @ q * scale, -1) @ v
                    got = output[b, h * (Q_HEADS // KV_HEADS) + g, 0]
                    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
        for b in range(BATCH):
            n_text = PROMPT - FIRST_IMAGE[b] - N_IMAGES[b] + step
            budget = text_budget(n_text, options.text_keep, options.text_min_budget)
            assert state.text_end[b] - state.text_start[b] == min(n_text, budget)
    # 40 tokens, 8 free slots per re-allocation (a concatenating cache would count 40)
    assert reallocations <= 40 // spare_slots(PROMPT), "decode tokens are written in place"
