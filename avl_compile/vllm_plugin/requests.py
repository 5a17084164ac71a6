"""Per-request A-VL state inside a vLLM worker, and what each step does with each request.

vLLM batches requests of every kind into one forward; a request's rows of that forward are
one of: a prefill chunk before the prompt's last (dense through vLLM's kernel; its query,
keys and values are kept for the last chunk), the prompt's last chunk (A-VL's prefill over
the whole prompt: scores, eviction, core, text heavy hitters), or a decode token (A-VL's
decode step on the request's compacted cache). Requests without an image, and requests the
plugin cannot follow (their prompt partly from vLLM's prefix cache, several tokens per
step after the prompt), run dense exactly as without the plugin.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from avl_compile.options import AvlOptions
from avl_compile.policies.common import PrefillContext
from avl_compile.policies.decode_schedule import LayerState
from avl_compile.vllm_plugin.kv_blocks import PromptMakeup, StorageBlocks

logger = logging.getLogger("avl_compile")


class RowKind(enum.Enum):
    DENSE = "dense"  # vLLM's own kernel
    PREFILL_PART = "prefill-part"  # dense, and its q/k/v kept for the last chunk
    PREFILL_LAST = "prefill-last"  # A-VL's prefill over the whole prompt
    DECODE = "decode"  # A-VL's decode step


@dataclasses.dataclass
class LayerCache:
    """A request's A-VL state at one layer; its rows live in the request's storage blocks
    of vLLM's cache (slot s of the policy's layout in storage block s // block_size)."""

    rows: int  # rows in use after this layer's last step (its storage blocks' first slots)
    capacity: int  # the policy's slots (rows in use and free ones) at this layer
    state: LayerState


@dataclasses.dataclass
class RequestState:
    """One request's A-VL state, across the layers of every step it runs in."""

    req_id: str
    image_mask: Tensor  # [1, prompt_len] bool
    prompt_len: int
    # earlier prefill chunks' (query, key, value) per layer, [L, H, D] each, until the last
    parts: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = dataclasses.field(default_factory=dict)
    context: PrefillContext | None = None  # the last prefill chunk's, shared by its layers
    layers: dict[int, LayerCache] = dataclasses.field(default_factory=dict)
    storage: StorageBlocks | None = None  # which of its blocks hold its rows (``kv_blocks``)


@dataclasses.dataclass
class BatchRequests:
    """What the model runner knows of one step's batch (``runner_hook.py``): the request
    ids in row order, each request's image-token spans and prompt length, and which
    requests are alive."""

    req_ids: list[str]
    image_spans: dict[str, list[tuple[int, int, Tensor | None]]]  # offset, length, is_embed
    prompt_lens: dict[str, int]
    live: set[str]
    # requests that have output tokens already: at their first token, recomputed after a
    # preemption (prompt and outputs as one prefill)
    with_output: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class PlannedRow:
    """One batch row of a step: which request, which tokens of the forward, what to do."""

    kind: RowKind
    start: int  # the row's tokens in the forward's flattened batch: [start, end)
    end: int
    request: RequestState | None = None
    blocks: Tensor | None = None  # A-VL rows: the request's storage blocks, in slot order


class RequestBook:
    """The A-VL states of one worker's live requests (one per attention-group builder).
    With ``options`` and ``block_size`` each A-VL request knows its storage blocks."""

    def __init__(
        self,
        combine_heads: Callable[[Tensor], Tensor] | None = None,
        options: AvlOptions | None = None,
        block_size: int | None = None,
    ) -> None:
        self.options, self.block_size = options, block_size
        self.states: dict[str, RequestState] = {}
        self.dense: dict[str, str] = {}  # requests run dense for good, and why
        self.combine_heads = None if combine_heads is None else self._counted(combine_heads)
        self.counters = {
            "avl_requests": 0,  # prompts A-VL prefilled
            "dense_requests": 0,  # requests that ran dense (no image, or not followable)
            "prefill_parts": 0,  # prompt chunks before a prompt's last (kept for it)
            "head_all_reduces": 0,  # tensor parallel: head means combined across ranks
            "peak_live_states": 0,
            # summed over A-VL decode tokens (per request and step) ...
            "decode_tokens": 0,
            "vllm_blocks": 0,  # vLLM's KV blocks the request holds (its storage blocks)
            "dense_blocks": 0,  # blocks the sequence would hold dense
            "dense_rows": 0,  # rows a dense step attends (the sequence so far)
            # ... and over A-VL decode tokens and layers
            "decode_layer_steps": 0,
            "attended_rows": 0,  # rows A-VL's step attended
            "kept_rows": 0,  # A-VL's rows in use
            "allocated_slots": 0,  # its storage blocks' slots (what it occupies)
        }
        self._warned: set[str] = set()

    def _counted(self, combine: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def combine_heads(local_mean: Tensor) -> Tensor:
            self.counters["head_all_reduces"] += 1
            return combine(local_mean)

        return combine_heads

    def plan(
        self, batch: BatchRequests | None, query_lens: list[int], context_lens: list[int]
    ) -> list[PlannedRow]:
        """What each row of this step does; frees the states of requests that are gone."""
        rows, start = [], 0
        for index, (q_len, context) in enumerate(zip(query_lens, context_lens, strict=True)):
            end = start + q_len
            req_id = None
            if batch is not None and index < len(batch.req_ids):
                req_id = batch.req_ids[index]
            kind, request = self._row_kind(batch, req_id, q_len, context)
            rows.append(PlannedRow(kind, start, end, request))
            start = end
        if batch is not None:
            self._free_gone(batch.live)
        self.counters["peak_live_states"] = max(self.counters["peak_live_states"], len(self.states))
        return rows

    def _row_kind(
        self, batch: BatchRequests | None, req_id: str | None, q_len: int, context: int
    ) -> tuple[RowKind, RequestState | None]:
        if batch is None or req_id is None or q_len == 0:
            return RowKind.DENSE, None
        spans = batch.image_spans.get(req_id)
        prompt_len = batch.prompt_lens[req_id]
        if context == 0:  # a new request, or one vLLM recomputes from its start
            self.states.pop(req_id, None)
            self.dense.pop(req_id, None)
            if req_id in batch.with_output and spans:
                return self._give_up(req_id, "recomputed after a preemption, outputs included")
        if req_id in self.dense:
            return RowKind.DENSE, None
        if not spans:  # nothing for A-VL to choose from
            self.dense[req_id] = "no image"
            self.counters["dense_requests"] += 1
            return RowKind.DENSE, None
        if context == 0:
            mask = image_mask_of(spans, prompt_len)
            storage = None
            if self.options is not None and self.block_size is not None:
                storage = StorageBlocks(self.options, PromptMakeup.of(mask), self.block_size)
            self.states[req_id] = RequestState(req_id, mask, prompt_len, storage=storage)
        request = self.states.get(req_id)
        if request is None:
            return self._give_up(
                req_id,
                "its prompt's first tokens came from vLLM's prefix cache, whose keys the "
                "plugin did not see (enable_prefix_caching=False lets A-VL serve such "
                "prompts)",
            )
        if context + q_len < prompt_len:
            self.counters["prefill_parts"] += 1
            return RowKind.PREFILL_PART, request
        if context < prompt_len:  # this chunk ends the prompt
            if context + q_len != prompt_len:
                return self._give_up(req_id, "a chunk ran past the prompt's end")
            request.context = PrefillContext(
                image_mask=request.image_mask, combine_heads=self.combine_heads
            )
            self.counters["avl_requests"] += 1
            return RowKind.PREFILL_LAST, request
        if q_len != 1:
            return self._give_up(req_id, "several tokens in one step after the prompt")
        if not request.layers:  # its prompt's last chunk never reached a layer
            return self._give_up(req_id, "no A-VL state after its prompt")
        return RowKind.DECODE, request

    def _give_up(self, req_id: str, why: str) -> tuple[RowKind, None]:
        """The request runs dense from here (vLLM's cache holds all of its keys)."""
        request = self.states.get(req_id)
        if request is not None and request.storage is not None and request.context is not None:
            raise RuntimeError(
                f"avl vLLM plugin: request {req_id} cannot go on ({why}): after its prompt "
                "A-VL gave its evicted rows' KV blocks back to vLLM, so it cannot run dense"
            )
        self.states.pop(req_id, None)
        self.dense[req_id] = why
        self.counters["dense_requests"] += 1
        if why not in self._warned:
            self._warned.add(why)
            logger.warning("avl vLLM plugin: request %s runs dense: %s", req_id, why)
        return RowKind.DENSE, None

    def _free_gone(self, live: Iterable[str]) -> None:
        live = set(live)
        for req_id in [r for r in self.states if r not in live]:
            del self.states[req_id]
        for req_id in [r for r in self.dense if r not in live]:
            del self.dense[req_id]


def image_spans(mm_features: Iterable[Any] | None) -> list[tuple[int, int, Tensor | None]]:
    """(offset, length, is_embed) of a request's image placeholders (vLLM's
    ``MultiModalFeatureSpec``s, the same on the scheduler's and the worker's side)."""
    return [
        (f.mm_position.offset, f.mm_position.length, f.mm_position.is_embed)
        for f in mm_features or ()
        if f.modality == "image"
    ]


def image_mask_of(spans: list[tuple[int, int, Tensor | None]], prompt_len: int) -> Tensor:
    """[1, prompt_len] bool: the prompt's image tokens, from vLLM's placeholder ranges
    (``is_embed``: which positions of a range take an image embedding)."""
    mask = torch.zeros(1, prompt_len, dtype=torch.bool)
    for offset, length, is_embed in spans:
        if is_embed is None:
            mask[0, offset : offset + length] = True
        else:
            mask[0, offset : offset + length] = is_embed.to(torch.bool).cpu()
    return mask
