"""The scheduler's side of A-VL's memory saving: a KV-cache spec and manager of the plugin's
own, so that vLLM's scheduler counts the blocks A-VL gives back as free and admits more.

``AvlAttentionSpec`` is vLLM's full-attention spec with A-VL's options on it; the model
runner hands it out in the layers' place (``runner_hook``) and ``register_spec`` registers
it, with ``AvlKVCacheManager``, in vLLM's KV-cache spec registry (grouped with full
attention).
The manager treats each request as full attention until it knows it as an A-VL one (an
image, its prompt computed here from the start): then, once the prompt has run, it frees
the prompt's blocks past the storage ones (``kv_blocks.StorageBlocks``), and of the entries
decode tokens add it makes real blocks only of those the rows need (vLLM's null block for
the rest). The worker decides the same entries from the same counts. An A-VL request's
blocks are never put in the prefix cache (A-VL rewrites them); a prompt that starts from
the prefix cache, or is recomputed after a preemption, stays full attention (the worker
runs it dense: ``requests.RequestBook``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from avl_compile.options import AvlOptions
from avl_compile.vllm_plugin.kv_blocks import PromptMakeup, StorageBlocks
from avl_compile.vllm_plugin.requests import image_mask_of, image_spans

_WRAPPED = "_avl_wraps"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AvlAttentionSpec(FullAttentionSpec):
    """Full attention whose A-VL requests give back their evicted rows' blocks."""

    avl_options: str  # JSON of A-VL's options (a spec is hashable and crosses processes)

    @classmethod
    def of(cls, spec: FullAttentionSpec, options: AvlOptions) -> AvlAttentionSpec:
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec)}
        return cls(**fields, avl_options=json.dumps(dataclasses.asdict(options), sort_keys=True))

    @classmethod
    def merge(cls, specs: list[Any]) -> AvlAttentionSpec:
        options = {spec.avl_options for spec in specs}
        if len(options) != 1:
            raise AssertionError("every A-VL layer of a KV-cache group has the same options")
        return cls.of(FullAttentionSpec.merge(specs), options_of(options.pop()))


def options_of(spec_options: str) -> AvlOptions:
    raw = json.loads(spec_options)
    if raw.get("vision_keep_layers") is not None:
        raw["vision_keep_layers"] = tuple(raw["vision_keep_layers"])
    return AvlOptions.from_mapping(raw)


class AvlKVCacheManager(FullAttentionManager):
    """vLLM's full-attention manager, giving back A-VL requests' blocks (module doc)."""

    def __init__(self, kv_cache_spec: AvlAttentionSpec, **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        install_scheduler_hook()
        self.options = options_of(kv_cache_spec.avl_options)
        self.storage: dict[str, StorageBlocks] = {}  # the A-VL requests

    def note_request(self, request: Any, prefix_hit_tokens: int) -> None:
        """Called before each allocation (``install_scheduler_hook``): at a request's first
        token, whether A-VL serves it (as the worker decides: ``RequestBook``)."""
        if request.num_computed_tokens > 0:
            return
        self.storage.pop(request.request_id, None)
        fresh = request.num_output_tokens == 0 and prefix_hit_tokens == 0
        spans = image_spans(request.mm_features)
        if fresh and spans:
            mask = image_mask_of(spans, request.num_prompt_tokens)
            makeup = PromptMakeup.of(mask)
            self.storage[request.request_id] = StorageBlocks(self.options, makeup, self.block_size)

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        storage = self.storage.get(request_id)
        if storage is None or processed_computed_tokens < storage.prompt.length:
            return super().remove_skipped_blocks(
                request_id, processed_computed_tokens, num_prompt_tokens
            )
        # the prompt has run: its rows are in the storage blocks now
        self._remove_blocks_in_range(request_id, storage.kept_prompt_blocks, storage.prompt_blocks)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        storage = self.storage.get(request_id)
        held = len(self.req_to_blocks.get(request_id, ()))
        if storage is None or held < storage.prompt_blocks:
            return super().get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs)
        new_entries = range(held, -(-num_tokens // self.block_size))
        return sum(storage.is_storage(j) for j in new_entries)

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        storage = self.storage.get(request_id)
        blocks = self.req_to_blocks[request_id]
        if storage is None or len(blocks) < storage.prompt_blocks:
            return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        new: list[KVCacheBlock] = []
        for entry in range(len(blocks), -(-num_tokens // self.block_size)):
            if storage.is_storage(entry):
                (block,) = self.block_pool.get_new_blocks(1)
                new.append(block)
                blocks.append(block)
            else:
                blocks.append(self._null_block)
        if self._record_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in new)
        return new

    def cache_blocks(self, request: Any, num_tokens: int, *args: Any, **kwargs: Any) -> None:
        if request.request_id not in self.storage:  # A-VL rewrites its blocks: never shared
            super().cache_blocks(request, num_tokens, *args, **kwargs)

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        self.storage.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def register_spec() -> None:
    """Registers the spec and its manager in vLLM's KV-cache spec registry."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry.register(
        AvlAttentionSpec, AvlKVCacheManager, uniform_type_base_spec=FullAttentionSpec
    )


def install_scheduler_hook() -> None:
    """Wraps ``KVCacheManager.allocate_slots`` so that the plugin's managers see each
    request (vLLM hands a single-type manager request ids only; A-VL's block counts need
    the request's image placeholders)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    original = KVCacheManager.allocate_slots
    if getattr(original, _WRAPPED, False):
        return

    def allocate_slots(self, request, num_new_tokens, num_new_computed_tokens=0, *args, **kwargs):
        external = kwargs.get("num_external_computed_tokens", 0)
        if len(args) >= 3:
            external = args[2]
        for manager in self.coordinator.single_type_managers:
            if isinstance(manager, AvlKVCacheManager):
                manager.note_request(request, num_new_computed_tokens + external)
        return original(self, request, num_new_tokens, num_new_computed_tokens, *args, **kwargs)

    setattr(allocate_slots, _WRAPPED, True)
    allocate_slots.__wrapped__ = original  # type: ignore[attr-defined]
    KVCacheManager.allocate_slots = allocate_slots
