"""The A-VL policy's cache layout at one attention site, step by step, on random tensors.

The end-to-end oracles compare generated tokens; these check the layout itself: every
occupied slot holds the K/V row of the token its position names (through trims and
re-allocations), the roles say what each slot holds, decode attends exactly sink + core +
text (everything at a refresh), and tokens are written in place."""

import pytest
import torch

from avl_compile.options import AvlOptions
from avl_compile.policies.avl import AvlPolicy
from avl_compile.policies.avl_decode import CORE, FREE, OTHER, SINK, TEXT, TEXT_END, TEXT_START
from avl_compile.policies.budgets import fraction_count, text_budget
from avl_compile.policies.common import PrefillContext
from avl_compile.policies.decode_schedule import LayerState, spare_slots

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


def _check_layout(state: LayerState, keys, values, all_keys, all_values, image_mask):
    slots = state.slots
    for b in range(BATCH):
        text_end, text_start = (int(slots.counters[b, c]) for c in (TEXT_END, TEXT_START))
        role = slots.role[b]
        assert (role[text_start:text_end] == TEXT).all() and (role[text_end:] == FREE).all()
        assert not (role[:text_start] == TEXT).any(), "text slots are contiguous"
        for h in range(KV_HEADS):
            position = slots.position[b, h]
            assert (position[text_end:] == -1).all(), "free slots hold no token"
            occupied = position[:text_end]
            assert torch.equal(keys[b, h, :text_end], all_keys[b, h, occupied])
            assert torch.equal(values[b, h, :text_end], all_values[b, h, occupied])
            is_image = image_mask[b, occupied]
            image_slot = (role[:text_end] == CORE) | (role[:text_end] == OTHER)
            assert torch.equal(is_image, image_slot), "image roles hold image rows"
            sink = occupied[role[:text_end] == SINK]
            assert torch.equal(sink.sort().values, torch.arange(FIRST_IMAGE[b])), "the sink"
            text = occupied[text_start:text_end]
            assert (text >= FIRST_IMAGE[b]).all()
            # a text row's rank orders it among the row's text tokens
            ranks = slots.text_rank[b, h, text_start:text_end]
            assert torch.equal(ranks.argsort(), text.argsort())
            assert len(set(occupied.tolist())) == text_end, "no token twice"


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
        role = state.slots.role[b]
        assert int((role == CORE).sum()) == (n_secondary if refresh_every == -1 else n_core)
        assert int(((role == CORE) | (role == OTHER)).sum()) == n_secondary

    reallocations = 0
    for step in range(1, 41):
        new_q = torch.randn(BATCH, Q_HEADS, 1, DIM, generator=generator, dtype=torch.float64)
        new_k = torch.randn(BATCH, KV_HEADS, 1, DIM, generator=generator, dtype=torch.float64)
        new_v = torch.randn_like(new_k)
        all_keys, all_values = torch.cat([all_keys, new_k], 2), torch.cat([all_values, new_v], 2)
        before = cache_keys
        refresh = refresh_every == 3 and step % 3 == 0
        # rows attended: the state's view before the step (per kv head), plus the new token
        role, position = state.slots.role, state.slots.position
        attended = role >= SINK if not refresh else role != FREE
        attended_rows = [
            [position[b, h][attended[b, : position.shape[2]]].tolist() for h in range(KV_HEADS)]
            for b in range(BATCH)
        ]
        output, cache_keys, cache_values = policy.decode(
            new_q, before, new_k, cache_values, new_v, scale, state
        )
        reallocations += cache_keys is not before
        counted = sum(len(attended_rows[b][0]) + 1 for b in range(BATCH)) / BATCH
        assert state.attended_rows == counted, "the host counts the rows the step attended"
        _check_layout(state, cache_keys, cache_values, all_keys, all_values, image_mask)
        for b in range(BATCH):
            for h in range(KV_HEADS):
                rows = sorted(attended_rows[b][h] + [PROMPT + step - 1])
                k, v = all_keys[b, h, rows], all_values[b, h, rows]
                for g in range(Q_HEADS // KV_HEADS):
                    q = new_q[b, h * (Q_HEADS // KV_HEADS) + g, 0]
                    expected = torch.softmax(k @ q * scale, -1) @ v
                    got = output[b, h * (Q_HEADS // KV_HEADS) + g, 0]
                    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
        for b in range(BATCH):
            n_text = PROMPT - FIRST_IMAGE[b] - N_IMAGES[b] + step
            budget = text_budget(n_text, options.text_keep, options.text_min_budget)
            kept = int((state.slots.role[b] == TEXT).sum())
            assert kept == state.schedule.kept_text[b] == min(n_text, budget)
            n_core = fraction_count(options.vision_compute, N_IMAGES[b])
            n_secondary = fraction_count(options.vision_keep, N_IMAGES[b])
            cores = int((state.slots.role[b] == CORE).sum())
            assert cores == (n_secondary if refresh_every == -1 else n_core)
    # 40 tokens, 8 free slots per re-allocation (a concatenating cache would count 40)
    assert reallocations <= 40 // spare_slots(PROMPT), "decode tokens are written in place"
