"""The vLLM plugin's per-step plan of each batch row (no vLLM needed: plain data in, rows out)."""

from __future__ import annotations

import logging

import pytest
import torch

from avl_compile.options import AvlOptions
from avl_compile.vllm_plugin.requests import (
    BatchRequests,
    RequestBook,
    RowKind,
    image_mask_of,
)

IMAGE = [(2, 4, None)]  # image tokens at positions 2..5


def batch(req_ids, prompt_lens, spans=None, live=None) -> BatchRequests:
    spans = spans if spans is not None else {r: IMAGE for r in req_ids}
    return BatchRequests(list(req_ids), spans, dict(prompt_lens), set(live or req_ids))


def kinds(rows):
    return [row.kind for row in rows]


def test_a_request_goes_from_prefill_chunks_to_decode():
    book = RequestBook()
    step = batch(["a"], {"a": 10})
    assert kinds(book.plan(step, [6], [0])) == [RowKind.PREFILL_PART]
    assert book.states["a"].image_mask[0].tolist() == [False] * 2 + [True] * 4 + [False] * 4
    rows = book.plan(step, [4], [6])
    assert kinds(rows) == [RowKind.PREFILL_LAST]
    assert rows[0].request.context is not None and book.counters["avl_requests"] == 1
    rows[0].request.layers[0] = object()  # what a layer's prefill leaves
    assert kinds(book.plan(step, [1], [10])) == [RowKind.DECODE]
    assert (rows[0].start, rows[0].end) == (0, 4)


def test_rows_are_planned_per_request_in_a_mixed_batch():
    book = RequestBook()
    first = batch(["a", "t"], {"a": 8, "t": 5}, spans={"a": IMAGE, "t": []})
    rows = book.plan(first, [8, 5], [0, 0])
    assert kinds(rows) == [RowKind.PREFILL_LAST, RowKind.DENSE]
    assert [(r.start, r.end) for r in rows] == [(0, 8), (8, 13)]
    assert "t" not in book.states and book.dense["t"] == "no image"
    rows[0].request.layers[0] = object()
    # a new request joins, "t" has left; "a" decodes
    second = batch(["a", "b"], {"a": 8, "b": 8})
    rows = book.plan(second, [1, 8], [8, 0])
    assert kinds(rows) == [RowKind.DECODE, RowKind.PREFILL_LAST]
    rows[1].request.layers[0] = object()
    assert "t" not in book.dense  # freed once vLLM dropped it
    assert set(book.states) == {"a", "b"}
    # "a" finished: its state is freed at the next step
    book.plan(batch(["b"], {"b": 8}), [1], [8])
    assert set(book.states) == {"b"} and book.counters["peak_live_states"] == 2


def test_a_request_vllm_recomputes_starts_afresh():
    book = RequestBook()
    step = batch(["a"], {"a": 8})
    rows = book.plan(step, [8], [0])
    old = rows[0].request
    rows = book.plan(step, [8], [0])  # preempted and recomputed from its start
    assert rows[0].request is not old and not rows[0].request.layers


def test_requests_the_plugin_cannot_follow_run_dense_with_one_warning(caplog):
    book = RequestBook()
    with caplog.at_level(logging.WARNING, logger="avl_compile"):
        # prompts whose first tokens came from vLLM's prefix cache
        assert kinds(book.plan(batch(["a"], {"a": 300}), [44], [256])) == [RowKind.DENSE]
        assert kinds(book.plan(batch(["b"], {"b": 300}), [44], [256])) == [RowKind.DENSE]
        assert kinds(book.plan(batch(["a"], {"a": 300}), [1], [300])) == [RowKind.DENSE]
    warnings = [r for r in caplog.records if "prefix cache" in r.getMessage()]
    assert len(warnings) == 1
    # several tokens after the prompt (speculative decoding): dense from there on
    rows = book.plan(batch(["c"], {"c": 8}), [8], [0])
    rows[0].request.layers[0] = object()
    assert kinds(book.plan(batch(["c"], {"c": 8}), [3], [8])) == [RowKind.DENSE]
    assert "c" not in book.states and book.dense["c"].startswith("several tokens")
    # a prompt whose last chunk left no layer state (never expected): dense, and says so
    book.plan(batch(["d"], {"d": 8}), [8], [0])
    assert kinds(book.plan(batch(["d"], {"d": 8}), [1], [8])) == [RowKind.DENSE]
    assert book.dense["d"] == "no A-VL state after its prompt"


def test_rows_without_a_known_request_run_dense():
    book = RequestBook()
    assert kinds(book.plan(None, [4, 1], [0, 9])) == [RowKind.DENSE, RowKind.DENSE]
    # a padded row past the batch's requests
    rows = book.plan(batch(["a"], {"a": 8}), [8, 0], [0, 0])
    assert kinds(rows) == [RowKind.PREFILL_LAST, RowKind.DENSE]


def test_combined_head_means_are_counted():
    book = RequestBook(combine_heads=lambda t: t * 2)
    assert torch.equal(book.combine_heads(torch.ones(2)), torch.full((2,), 2.0))
    assert book.counters["head_all_reduces"] == 1
    rows = book.plan(batch(["a"], {"a": 8}), [8], [0])
    assert rows[0].request.context.combine_heads is book.combine_heads


def test_image_mask_follows_placeholder_ranges_and_is_embed():
    is_embed = torch.tensor([False, True, True, False])
    mask = image_mask_of([(1, 2, None), (5, 4, is_embed)], 10)
    assert mask[0].nonzero().flatten().tolist() == [1, 2, 6, 7]


def test_a_request_whose_blocks_went_back_cannot_fall_back_to_dense():
    """With storage blocks (the plugin's engines) an A-VL request's evicted rows' blocks go
    back to vLLM after its prompt: a later give-up would read a partial history, so it is
    an error naming the reason; before the prompt's end it still runs dense."""
    book = RequestBook(options=AvlOptions(), block_size=4)
    rows = book.plan(batch(["a"], {"a": 10}), [10], [0])
    assert rows[0].request.storage is not None
    assert rows[0].request.storage.prompt_blocks == 3
    rows[0].request.layers[0] = object()
    with pytest.raises(RuntimeError, match="several tokens.*blocks back"):
        book.plan(batch(["a"], {"a": 10}), [3], [10])
    # a recomputed prompt running past its end (after a preemption): dense, as before
    assert kinds(book.plan(batch(["b"], {"b": 8}), [12], [0])) == [RowKind.DENSE]
    # recomputed in chunks, one ending at the prompt's end: dense from its first chunk (the
    # scheduler's manager keeps such a request's blocks: kv_manager.note_request)
    resumed = batch(["c"], {"c": 8})
    resumed.with_output.add("c")
    assert kinds(book.plan(resumed, [4], [0])) == [RowKind.DENSE]
    assert kinds(book.plan(resumed, [4], [4])) == [RowKind.DENSE]
    assert kinds(book.plan(resumed, [2], [8])) == [RowKind.DENSE]
    assert book.dense["c"].startswith("recomputed after a preemption")
