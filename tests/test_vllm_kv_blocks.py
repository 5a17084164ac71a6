"""The vLLM plugin's block counting (``kv_blocks.py``) against the policy it sizes for (the
rows the policy keeps at every step fit the storage blocks both sides of vLLM compute),
and its rows in those blocks (``paged_rows.py``). No vLLM needed."""

from __future__ import annotations

import pytest
import torch

from avl_compile.options import AvlOptions
from avl_compile.policies.avl import AvlPolicy
from avl_compile.policies.common import PrefillContext
from avl_compile.vllm_plugin.kv_blocks import PromptMakeup, StorageBlocks
from avl_compile.vllm_plugin.paged_rows import PagedRows

Q_HEADS, KV_HEADS, DIM = 4, 2, 8


def run_policy(options: AvlOptions, image_mask: torch.Tensor, steps: int, layer: int = 0):
    """rows_in_use of one layer after its prefill and after each of ``steps`` decodes."""
    generator = torch.Generator().manual_seed(layer)
    length = image_mask.shape[-1]
    q = torch.randn(1, Q_HEADS, length, DIM, generator=generator)
    k = torch.randn(1, KV_HEADS, length, DIM, generator=generator)
    v = torch.randn_like(k)
    policy = AvlPolicy(options, layer)
    context = PrefillContext(image_mask=image_mask.view(1, -1))
    _, keys, values, state = policy.prefill(q, k, v, None, True, DIM**-0.5, context)
    rows = [state.rows_in_use]
    for _ in range(steps):
        new = [
            torch.randn(1, h, 1, DIM, generator=generator) for h in (Q_HEADS, KV_HEADS, KV_HEADS)
        ]
        _, keys, values = policy.decode(new[0], keys, new[1], values, new[2], DIM**-0.5, state)
        rows.append(state.rows_in_use)
    return rows


def mask(length: int, first_image: int, images: int) -> torch.Tensor:
    m = torch.zeros(length, dtype=torch.bool)
    m[first_image : first_image + images] = True
    return m


@pytest.mark.parametrize(
    "options",
    [
        AvlOptions(),
        AvlOptions(vision_keep=0.25, vision_compute=0.1, text_keep=0.3, text_min_budget=4),
        AvlOptions(vision_keep=1.0, vision_compute=1.0, text_keep=1.0),
        AvlOptions(vision_keep_layers=(0.6, 0.4), vision_keep=0.5, vision_compute=0.3),
    ],
    ids=["defaults", "small", "full", "layer-budgets"],
)
def test_resident_rows_are_the_policys_rows_in_use(options):
    image_mask = mask(90, 5, 48)
    prompt = PromptMakeup.of(image_mask)
    assert (prompt.sink, prompt.images, prompt.text) == (5, 48, 37)
    per_layer = [run_policy(options, image_mask, 40, layer) for layer in range(2)]
    widest = [max(rows) for rows in zip(*per_layer, strict=True)]
    storage = StorageBlocks(options, prompt, 16)
    assert widest == [storage.rows_after(prompt.length + d) for d in range(41)]


@pytest.mark.parametrize("block_size", [4, 16, 32])
def test_storage_blocks_hold_the_rows_at_every_length(block_size):
    options = AvlOptions(text_min_budget=4)
    prompt = PromptMakeup.of(mask(70, 3, 40))
    storage = StorageBlocks(options, prompt, block_size)
    assert storage.prompt_blocks == -(-70 // block_size)
    assert storage.kept_prompt_blocks < storage.prompt_blocks  # blocks go back to vLLM
    for tokens in range(prompt.length, 400):
        entries = storage.entries_for(tokens)
        assert entries[: storage.kept_prompt_blocks] == list(range(storage.kept_prompt_blocks))
        assert len(entries) * block_size >= storage.rows_after(tokens)
        # and no more than one block beyond what the rows need
        assert len(entries) <= -(-storage.rows_after(tokens) // block_size) + 1
    # a second copy (the other side of vLLM) decides the same entries
    again = StorageBlocks(options, prompt, block_size)
    assert again.entries(40) == storage.entries(40)


def test_at_full_budgets_every_block_is_kept():
    options = AvlOptions(vision_keep=1.0, vision_compute=1.0, text_keep=1.0)
    storage = StorageBlocks(options, PromptMakeup.of(mask(70, 3, 40)), 16)
    assert storage.entries_for(200) == list(range(-(-200 // 16)))


def test_a_prompt_without_text_after_its_image_keeps_the_minimum_text_budget():
    prompt = PromptMakeup.of(mask(20, 4, 16))
    assert prompt.text == 0
    options = AvlOptions(text_min_budget=3)
    storage = StorageBlocks(options, prompt, 8)
    assert [storage.rows_after(prompt.length + d) for d in range(5)] == [12, 13, 14, 15, 15]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_written_to_storage_blocks_read_back_and_touch_nothing_else(dtype):
    block, heads, dim = 8, 2, 4
    cache = torch.zeros(6, heads, block, 2 * dim, dtype=dtype)  # vLLM's CPU cache shape
    paged, blocks = PagedRows(block, dim), torch.tensor([4, 1, 3])
    keys = torch.randn(1, heads, 19, dim).to(dtype)
    values = torch.randn_like(keys)
    paged.write(cache, blocks, torch.arange(19), keys, values)
    assert (cache[[0, 2, 5]] == 0).all(), "only the storage blocks are written"
    got_keys, got_values = paged.read(cache, blocks, 19)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
    # a step's changed slots, written alone (one in the third block)
    slots = torch.tensor([2, 17])
    new_keys, new_values = torch.randn(1, heads, 2, dim).to(dtype), torch.randn(1, heads, 2, dim)
    paged.write(cache, blocks, slots, new_keys, new_values)
    keys[:, :, slots], values[:, :, slots] = new_keys, new_values.to(dtype)
    got_keys, got_values = paged.read(cache, blocks, 19)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
    assert paged.read(cache, blocks, 5)[0].shape == (1, heads, 5, dim)
