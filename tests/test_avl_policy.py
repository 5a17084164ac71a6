"""Pieces of the A-VL decode policy that the end-to-end oracles do not isolate."""

import torch

from avl_compile.policies.common import mask_to_ranges as _mask_to_ranges


def test_mask_to_ranges_lists_each_run_once():
    mask = torch.tensor(
        [
            [1, 1, 0, 0, 1, 1, 1, 0, 1],  # sink | image (off) | text | empty | new token
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    ranges = _mask_to_ranges(mask)
    assert ranges.tolist() == [
        [[0, 2], [4, 7], [8, 9]],
        [[0, 0], [0, 0], [0, 0]],
        [[0, 9], [0, 0], [0, 0]],
    ]
    rebuilt = torch.zeros_like(mask)
    for b, row in enumerate(ranges.tolist()):
        for start, stop in row:
            rebuilt[b, start:stop] = True
    assert torch.equal(rebuilt, mask)
