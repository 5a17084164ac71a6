"""A-VL as a vLLM attention backend (CPU engine): vLLM's CPU backend for every dense row,
A-VL's policy (``avl_compile.policies.avl``, the code the Hugging Face path runs) for the
rows of requests with an image.

vLLM calls one backend for all requests of a step. The metadata builder (one per KV-cache
group, so shared by the decoder layers) plans each batch row (``requests.RequestBook``)
and builds vLLM's CPU metadata for the dense rows alone; each layer's ``forward`` then runs
vLLM's kernel over the dense rows' tokens and the policy over each A-VL row:
``AvlPolicy.prefill`` at a prompt's last chunk (over the whole prompt, whose earlier
chunks' queries and keys the layer kept) and ``AvlPolicy.decode`` at each decode token.
An A-VL request's rows live in its storage blocks of vLLM's paged cache (``kv_blocks``):
the prefill writes the rows it keeps there, a decode step reads them, runs the policy and
writes back the slots it changed; vLLM's own write of a decode token is skipped (its
position's block is given back or holds rows). The scheduler's side, which frees the other
blocks, is ``kv_manager`` (its spec replaces the layers' own: ``runner_hook``).
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import Tensor
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import AttentionLayer, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from avl_compile.policies.avl import AvlPolicy
from avl_compile.vllm_plugin.options import serving_options
from avl_compile.vllm_plugin.paged_rows import PagedRows
from avl_compile.vllm_plugin.requests import (
    BatchRequests,
    LayerCache,
    PlannedRow,
    RequestBook,
    RowKind,
)
from avl_compile.vllm_plugin.runner_hook import install_runner_hook

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


class AvlAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with A-VL for requests that carry an image."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[AvlAttentionImpl]:
        return AvlAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[AvlMetadataBuilder]:
        return AvlMetadataBuilder


@dataclasses.dataclass
class AvlAttentionMetadata:
    num_actual_tokens: int
    slot_mapping: Tensor
    dense: CPUAttentionMetadata | None  # vLLM's metadata of the dense rows, None if none
    dense_tokens: Tensor | None  # their tokens in the forward (None: every token, in place)
    rows: list[PlannedRow]  # the rows A-VL runs (prefill chunks and decode tokens)
    book: RequestBook
    own_writes: Tensor | None = None  # tokens vLLM must not write (A-VL's decode tokens)


class AvlMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata builder, plus each step's plan of which rows A-VL runs."""

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device):
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise NotImplementedError(
                "avl vLLM plugin: A-VL's attention backend runs on vLLM's CPU engine only "
                f"(it builds on vLLM's CPU kernel); this engine's platform is "
                f"{current_platform.device_name!r}"
            )
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.book = RequestBook(
            combine_heads=mean_over_ranks if tp_size > 1 else None,
            options=serving_options(vllm_config.additional_config, tp_size),
            block_size=kv_cache_spec.block_size,
        )
        self.batch: BatchRequests | None = None  # set by the runner hook at every step
        install_runner_hook()

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> AvlAttentionMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        starts = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        query_lens = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
        seq_lens = cm.seq_lens[:num_reqs].tolist()
        context_lens = [s - q for s, q in zip(seq_lens, query_lens, strict=True)]
        rows = self.book.plan(self.batch, query_lens, context_lens)
        self._storage_blocks(rows, cm.block_table_tensor, seq_lens)
        self._count_decode_tokens(rows, seq_lens)
        dense = [i for i, r in enumerate(rows) if r.kind in (RowKind.DENSE, RowKind.PREFILL_PART)]
        dense_metadata, dense_tokens = None, None
        if len(dense) == num_reqs:  # no A-VL row computes attention: vLLM's own metadata
            dense_metadata = super().build(common_prefix_len, cm, fast_build)
        elif dense:
            dense_metadata, dense_tokens = self._dense_rows(cm, rows, dense, seq_lens, fast_build)
        decode_tokens = [r.start for r in rows if r.kind is RowKind.DECODE]
        return AvlAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            slot_mapping=cm.slot_mapping,
            dense=dense_metadata,
            dense_tokens=dense_tokens,
            rows=[r for r in rows if r.kind is not RowKind.DENSE],
            book=self.book,
            own_writes=torch.tensor(decode_tokens, dtype=torch.long) if decode_tokens else None,
        )

    def _storage_blocks(
        self, rows: list[PlannedRow], block_table: Tensor, seq_lens: list[int]
    ) -> None:
        """Each A-VL row's storage blocks, from its request's block table."""
        for index, (row, seq_len) in enumerate(zip(rows, seq_lens, strict=True)):
            if row.kind in (RowKind.PREFILL_LAST, RowKind.DECODE):
                assert row.request is not None and row.request.storage is not None
                entries = row.request.storage.entries_for(seq_len)
                row.blocks = block_table[index, entries].to("cpu", torch.long)

    def _dense_rows(
        self,
        cm: CommonAttentionMetadata,
        rows: list[PlannedRow],
        dense: list[int],
        seq_lens: list[int],
        fast_build: bool,
    ) -> tuple[CPUAttentionMetadata, Tensor]:
        """vLLM's CPU metadata for the ``dense`` batch rows alone, and their tokens."""
        index = torch.tensor(dense, dtype=torch.long)
        dense_lens = [rows[i].end - rows[i].start for i in dense]
        tokens = torch.cat([torch.arange(rows[i].start, rows[i].end) for i in dense])
        loc = torch.zeros(len(dense) + 1, dtype=cm.query_start_loc_cpu.dtype)
        loc[1:] = torch.tensor(dense_lens).cumsum(0)
        sub = cm.replace(
            query_start_loc=loc.to(cm.query_start_loc.device),
            query_start_loc_cpu=loc,
            seq_lens=cm.seq_lens[index.to(cm.seq_lens.device)],
            num_reqs=len(dense),
            num_actual_tokens=int(tokens.numel()),
            max_query_len=max(dense_lens),
            max_seq_len=max(seq_lens[i] for i in dense),
            block_table_tensor=cm.block_table_tensor[index.to(cm.block_table_tensor.device)],
            is_prefilling=None if cm.is_prefilling is None else cm.is_prefilling[index],
            seq_lens_cpu_upper_bound=None,
        )
        return super().build(0, sub, fast_build), tokens.to(cm.slot_mapping.device)

    def _count_decode_tokens(self, rows: list[PlannedRow], seq_lens: list[int]) -> None:
        counters, block = self.book.counters, self.kv_cache_spec.block_size
        for row, seq_len in zip(rows, seq_lens, strict=True):
            if row.kind is RowKind.DECODE:
                assert row.blocks is not None
                counters["decode_tokens"] += 1
                counters["vllm_blocks"] += row.blocks.numel()
                counters["dense_blocks"] += -(-seq_len // block)
                counters["dense_rows"] += seq_len


class AvlAttentionImpl(CPUAttentionBackendImpl):
    """One decoder layer's attention: vLLM's kernel for dense rows, A-VL for the others."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = get_current_vllm_config()
        tp_size = config.parallel_config.tensor_parallel_size
        self.options = serving_options(config.additional_config, tp_size)
        self.policy: AvlPolicy | None = None  # made at the first call (its layer's index)
        self.paged: PagedRows | None = None  # made at the first A-VL row (the cache's layout)
        install_runner_hook()  # before the runner asks the layers for their KV-cache specs

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """vLLM's write of the step's keys and values, but for A-VL's decode tokens: their
        rows are written by A-VL into the request's storage blocks."""
        md = get_forward_context().attn_metadata
        md = md.get(layer.layer_name) if isinstance(md, dict) else None
        if isinstance(md, AvlAttentionMetadata) and md.own_writes is not None:
            slot_mapping = slot_mapping.clone()
            slot_mapping[md.own_writes.to(slot_mapping.device)] = -1  # vLLM's "no slot"
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def forward(
        self,
        layer: AttentionLayer,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        kv_cache: Tensor,
        attn_metadata: AvlAttentionMetadata | None,
        output: Tensor,
        output_scale: Tensor | None = None,
        output_block_scale: Tensor | None = None,
    ) -> Tensor:
        if attn_metadata is None:  # a warm-up run
            return output
        md = attn_metadata
        if not md.rows:
            return super().forward(layer, query, key, value, kv_cache, md.dense, output,
                                   output_scale, output_block_scale)  # fmt: skip
        if self.policy is None:
            self.policy = AvlPolicy(self.options, decoder_layer_index(layer))
        out = output.view(-1, self.num_heads, self.head_size)
        if md.dense is not None:
            if md.dense_tokens is None:
                super().forward(layer, query, key, value, kv_cache, md.dense, output)
            else:
                dense_out = out.new_empty((md.dense_tokens.numel(), *out.shape[1:]))
                super().forward(layer, query.index_select(0, md.dense_tokens), key, value,
                                kv_cache, md.dense, dense_out)  # fmt: skip
                out.index_copy_(0, md.dense_tokens, dense_out)
        if self.paged is None:  # the cache's block size is known here
            self.paged = PagedRows(kv_cache.shape[2], self.head_size)
        for row in md.rows:
            self._run_row(row, query, key, value, kv_cache, out, md.book.counters)
        return output

    def _run_row(
        self,
        row: PlannedRow,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        kv_cache: Tensor,
        out: Tensor,
        counters: dict[str, float],
    ) -> None:
        assert self.policy is not None and self.paged is not None and row.request is not None
        request, layer = row.request, self.policy.layer_idx
        q = query[row.start : row.end].view(-1, self.num_heads, self.head_size)
        k = key[row.start : row.end].view(-1, self.num_kv_heads, self.head_size)
        v = value[row.start : row.end].view(-1, self.num_kv_heads, self.head_size)
        if row.kind is RowKind.PREFILL_PART:  # dense already; kept for the last chunk
            request.parts.setdefault(layer, []).append((q.clone(), k.clone(), v.clone()))
            return
        if row.kind is RowKind.PREFILL_LAST:
            parts = request.parts.pop(layer, [])
            q_all, k_all, v_all = (
                torch.cat([*(part[i] for part in parts), x]) if parts else x
                for i, x in enumerate((q, k, v))
            )
            self.policy.prepare_prefill(
                heads_first(q_all), heads_first(k_all), None, True, self.scale, request.context
            )
            result, keys, values, state = self.policy.prefill(
                heads_first(q_all), heads_first(k_all), heads_first(v_all), None, True,
                self.scale, request.context,
            )  # fmt: skip
            rows = self._fitting_rows(row, state.rows_in_use)
            slots = torch.arange(rows)
            self.paged.write(kv_cache, row.blocks, slots, keys[:, :, :rows], values[:, :, :rows])
            request.layers[layer] = LayerCache(rows, keys.shape[2], state)
            out[row.start : row.end] = result[0, :, -q.shape[0] :].transpose(0, 1)
            return
        cache = request.layers[layer]
        state = cache.state
        keys, values = self._read_rows(kv_cache, row.blocks, cache.rows, cache.capacity)
        before = state.slots.position.clone()
        result, keys, values = self.policy.decode(
            heads_first(q), keys, heads_first(k), values, heads_first(v), self.scale, state
        )
        cache.capacity = keys.shape[2]
        cache.rows = rows = self._fitting_rows(row, state.rows_in_use)
        changed = changed_slots(before, state.slots.position, rows)
        self.paged.write(kv_cache, row.blocks, changed, keys[:, :, changed], values[:, :, changed])
        out[row.start : row.end] = result[0].transpose(0, 1)
        counters["decode_layer_steps"] += 1
        counters["attended_rows"] += state.attended_rows
        counters["kept_rows"] += state.rows_in_use
        counters["allocated_slots"] += row.blocks.numel() * self.paged.block_size

    def _read_rows(
        self, kv_cache: Tensor, blocks: Tensor, rows: int, capacity: int
    ) -> tuple[Tensor, Tensor]:
        """The policy's slot layout [1, Hkv, capacity, D]: the rows in use from the storage
        blocks, zeros in the free slots (never attended)."""
        assert self.paged is not None
        keys, values = self.paged.read(kv_cache, blocks, rows)
        if capacity > rows:
            pad = (0, 0, 0, capacity - rows)
            keys, values = torch.nn.functional.pad(keys, pad), torch.nn.functional.pad(values, pad)
        return keys, values

    def _fitting_rows(self, row: PlannedRow, rows: int) -> int:
        """``rows``, checked against the row's storage blocks (``kv_blocks`` sizes them
        from the same counts as the policy: a miss is a bug, never a silent overwrite)."""
        assert self.paged is not None and row.blocks is not None
        room = row.blocks.numel() * self.paged.block_size
        if rows > room:
            raise RuntimeError(
                f"avl vLLM plugin: {rows} A-VL rows do not fit the request's "
                f"{row.blocks.numel()} storage blocks ({room} slots)"
            )
        return rows


def changed_slots(before: Tensor, after: Tensor, rows: int) -> Tensor:
    """Slots [0, rows) whose token changed in any head (positions [1, Hkv, slots] before
    and after a step; a slot's keys and values are those of the token it holds)."""
    width = min(before.shape[-1], rows)
    changed = torch.ones(rows, dtype=torch.bool)
    changed[:width] = (before[0, :, :width] != after[0, :, :width]).any(dim=0)
    return torch.nonzero(changed).flatten()


def decoder_layer_index(layer: AttentionLayer) -> int:
    """The decoder layer's index, from vLLM's layer name ("...layers.3.self_attn.attn")."""
    name = getattr(layer, "layer_name", "")
    found = _LAYER_INDEX.search(name)
    if found is None:
        raise RuntimeError(
            f"avl vLLM plugin: attention layer {name!r} has no decoder layer index in its name "
            "(expected '...layers.<i>....'); A-VL's per-layer state needs it"
        )
    return int(found.group(1))


def heads_first(x: Tensor) -> Tensor:
    """[L, H, D] -> [1, H, L, D], contiguous (the policy's layout)."""
    return x.transpose(0, 1).unsqueeze(0).contiguous()


def mean_over_ranks(local_mean: Tensor) -> Tensor:
    """A mean over this rank's heads -> the mean over every rank's (equal head counts)."""
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

    world = get_tensor_model_parallel_world_size()
    return get_tp_group().all_reduce(local_mean.contiguous()) / world
