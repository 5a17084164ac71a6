"""Hands each step's request ids and image spans from vLLM's model runner to A-VL's builders.

vLLM's attention metadata (``CommonAttentionMetadata``) says where each batch row's tokens
are, not which request a row is nor where its image tokens lie; the model runner knows both
(``input_batch.req_ids``, each request's ``mm_features[i].mm_position``, vLLM's placeholder
ranges). vLLM 0.32 has no public hook between the two, so the plugin wraps the runner's
``_build_attention_metadata`` (private; called once per step, after the batch is final and
before any builder runs): the wrapper gives the runner's own A-VL builders the step's
``BatchRequests`` and changes nothing else. Installed once, by the first A-VL builder.
"""

from __future__ import annotations

from typing import Any

from avl_compile.vllm_plugin.requests import BatchRequests, image_spans

_WRAPPED = "_avl_wraps"


def install_runner_hook() -> None:
    """Wraps ``GPUModelRunner._build_attention_metadata`` (the CPU runner inherits it)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _install_spec_hook(GPUModelRunner)
    original = GPUModelRunner._build_attention_metadata
    if getattr(original, _WRAPPED, False):
        return

    def _build_attention_metadata(self, *args: Any, **kwargs: Any):
        builders = avl_builders_of(self)
        if builders:
            num_reqs = kwargs.get("num_reqs", args[1] if len(args) > 1 else None)
            batch = batch_requests_of(self, num_reqs)
            for builder in builders:
                builder.batch = batch
        return original(self, *args, **kwargs)

    setattr(_build_attention_metadata, _WRAPPED, True)
    _build_attention_metadata.__wrapped__ = original  # type: ignore[attr-defined]
    GPUModelRunner._build_attention_metadata = _build_attention_metadata


def _install_spec_hook(runner_class: Any) -> None:
    """Wraps the runner's ``get_kv_cache_spec``: with A-VL asked for, each decoder layer's
    full-attention spec becomes ``AvlAttentionSpec``, which carries the engine's A-VL
    options to the scheduler's KV-cache manager (``kv_manager``). vLLM's backend hook for
    a spec (``AttentionBackend.customize_spec``) runs where no engine config is current."""
    original = runner_class.get_kv_cache_spec
    if getattr(original, _WRAPPED, False):
        return

    def get_kv_cache_spec(self, *args: Any, **kwargs: Any):
        specs = original(self, *args, **kwargs)
        from avl_compile.vllm_plugin import uses_avl

        if not uses_avl(self.vllm_config):
            return specs
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        from avl_compile.vllm_plugin.kv_manager import AvlAttentionSpec
        from avl_compile.vllm_plugin.options import serving_options

        config = self.vllm_config
        options = serving_options(
            config.additional_config, config.parallel_config.tensor_parallel_size
        )
        return {
            name: AvlAttentionSpec.of(spec, options)
            if type(spec) is FullAttentionSpec and spec.sliding_window is None
            else spec
            for name, spec in specs.items()
        }

    setattr(get_kv_cache_spec, _WRAPPED, True)
    get_kv_cache_spec.__wrapped__ = original  # type: ignore[attr-defined]
    runner_class.get_kv_cache_spec = get_kv_cache_spec


def avl_builders_of(runner: Any) -> list[Any]:
    """The runner's A-VL metadata builders (none if A-VL is not its attention backend)."""
    from avl_compile.vllm_plugin.attention_backend import AvlMetadataBuilder

    return [
        builder
        for groups in getattr(runner, "attn_groups", [])
        for group in groups
        for builder in group.metadata_builders
        if isinstance(builder, AvlMetadataBuilder)
    ]


def batch_requests_of(runner: Any, num_reqs: int | None) -> BatchRequests | None:
    """The step's requests in row order, or None where the rows are not live requests (a
    warm-up or profiling run)."""
    if num_reqs is None:
        return None
    req_ids = list(runner.input_batch.req_ids[:num_reqs])
    requests = runner.requests
    if len(req_ids) < num_reqs or any(r is None or r not in requests for r in req_ids):
        return None
    spans, prompt_lens = {}, {}
    for req_id in req_ids:
        state = requests[req_id]
        prompt_lens[req_id] = state.num_prompt_tokens
        spans[req_id] = image_spans(state.mm_features)
    with_output = {r for r in req_ids if requests[r].output_token_ids}
    return BatchRequests(req_ids, spans, prompt_lens, set(requests), with_output)
