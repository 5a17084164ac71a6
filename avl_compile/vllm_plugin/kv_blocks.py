"""Which of a request's vLLM KV blocks hold its A-VL rows, decided the same way on both
sides of vLLM: the scheduler's KV-cache manager (``kv_manager.py``: which blocks to free,
which to allocate) and the worker's attention backend (which blocks to read and write).

After its prompt an A-VL request's layer caches hold, per head, the sink, the kept image
rows and the kept text: ``StorageBlocks.rows_after`` of them, a count that follows from the
budgets and the prompt's make-up alone (``AvlSchedule`` counts the same way), never from
scores.
The plugin stores those rows in the request's own blocks of vLLM's paged cache, in slot
order (slot s in the s // block_size-th storage block), and every other block goes back
to vLLM: the prompt keeps its first ``kept_prompt_blocks`` blocks, the rest is freed once
the prompt has run; of the block-table entries that later decode tokens add, only those
the growing text needs are real blocks, the others vLLM's null block. A decode token is
written into the rows (by A-VL), not at its position (vLLM's usual write is skipped).
No vLLM import: plain counting, tested without vLLM.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from avl_compile.options import AvlOptions
from avl_compile.policies.budgets import fraction_count, text_budget


@dataclasses.dataclass(frozen=True)
class PromptMakeup:
    """What of a prompt sets A-VL's row counts: the sink (tokens before the first image),
    the image tokens and the text tokens from the first image on."""

    length: int
    sink: int
    images: int
    text: int

    @classmethod
    def of(cls, image_mask: Tensor) -> PromptMakeup:
        """From a [L] or [1, L] bool mask of the prompt's image tokens."""
        mask = image_mask.reshape(-1).to(torch.bool)
        length, images = mask.numel(), int(mask.sum())
        sink = int(mask.int().argmax()) if images else length
        return cls(length, sink, images, length - sink - images)


def _image_rows(options: AvlOptions, prompt: PromptMakeup) -> int:
    keeps = options.vision_keep_layers or (options.vision_keep,)
    images = max(min(fraction_count(keep, prompt.images), prompt.images) for keep in keeps)
    return prompt.sink + images


def _kept_text(
    options: AvlOptions, prompt: PromptMakeup, decoded: int, kept: list[int] | None = None
) -> list[int]:
    """Kept text rows after 0, 1, ..., ``decoded`` decode tokens (extends ``kept``)."""
    kept = kept if kept is not None else []
    if not kept:
        kept.append(min(prompt.text, _budget(options, prompt.text)))
    while len(kept) <= decoded:
        n_text = prompt.text + len(kept)
        kept.append(min(kept[-1] + 1, _budget(options, n_text)))
    return kept


def _budget(options: AvlOptions, n_text: int) -> int:
    return text_budget(n_text, options.text_keep, options.text_min_budget)


class StorageBlocks:
    """Which entries of one A-VL request's block table hold its rows (its storage blocks).

    Entries below ``prompt_blocks`` are the prompt's: the first ``kept_prompt_blocks`` stay,
    enough for every token up to the prompt's last block's end. An entry j past the prompt
    is a storage block iff the rows after ``(j + 1) * block_size`` tokens need one more
    block than the entries before it give (the rows grow by at most one a token, so one
    more block per entry is always enough)."""

    def __init__(self, options: AvlOptions, prompt: PromptMakeup, block_size: int) -> None:
        self.options, self.prompt, self.block_size = options, prompt, block_size
        self.prompt_blocks = -(-prompt.length // block_size)
        self._image_rows = _image_rows(options, prompt)
        self._kept_text: list[int] = []  # after 0, 1, ... decode tokens
        self.kept_prompt_blocks = self._blocks_for(self.prompt_blocks * block_size)
        self._is_storage = [j < self.kept_prompt_blocks for j in range(self.prompt_blocks)]
        self._count = [self.kept_prompt_blocks]  # storage blocks among entries < P + i

    def rows_after(self, tokens: int) -> int:
        """Rows in use in the widest layer once the sequence holds ``tokens`` tokens (the
        prompt's at least): sink + floor(S_l * N) + the kept text, whose budget is
        max(round(T * n_text), min) and which grows by at most one row a token."""
        decoded = max(tokens - self.prompt.length, 0)
        kept = _kept_text(self.options, self.prompt, decoded, self._kept_text)
        return self._image_rows + kept[decoded]

    def _blocks_for(self, tokens: int) -> int:
        return -(-self.rows_after(tokens) // self.block_size)

    def is_storage(self, entry: int) -> bool:
        """Whether block-table entry ``entry`` is a storage block (else, past the prompt,
        vLLM's null block; before it, a prompt block freed after the prompt)."""
        while len(self._is_storage) <= entry:
            j = len(self._is_storage)
            needed = self._blocks_for((j + 1) * self.block_size)
            storage = needed > self._count[-1]
            self._is_storage.append(storage)
            self._count.append(self._count[-1] + storage)
        return self._is_storage[entry]

    def entries(self, num_entries: int) -> list[int]:
        """The storage entries among the first ``num_entries`` of the block table."""
        return [j for j in range(num_entries) if self.is_storage(j)]

    def entries_for(self, tokens: int) -> list[int]:
        """The storage entries of a sequence of ``tokens`` tokens (its block table's)."""
        return self.entries(-(-tokens // self.block_size))
