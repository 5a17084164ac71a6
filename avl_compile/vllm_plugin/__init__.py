"""A-VL inside vLLM: an out-of-tree attention backend, loaded by vLLM's plugin system.

``register`` is the ``vllm.general_plugins`` entry point; vLLM calls it in every process it
starts. It changes nothing until an engine asks for the CUSTOM attention backend:

    LLM(model=..., attention_backend="CUSTOM", additional_config={"avl": {...options...}})

It registers ``AvlAttentionBackend`` as vLLM's CUSTOM backend; on the CPU platform, which
picks its own backend whatever is asked, it makes the choice honour CUSTOM, registers
A-VL's KV-cache spec and manager (``kv_manager``) with the platform's own specs, and checks
A-VL's options when the engine's configuration is made (in the caller's process, so a bad
option is a ``ValueError`` there, not a failed engine start).
"""

from __future__ import annotations

BACKEND_PATH = "avl_compile.vllm_plugin.attention_backend.AvlAttentionBackend"
_PATCHED = "_avl_patched"


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    _cpu_platform_honours_custom()


def _cpu_platform_honours_custom() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if getattr(CpuPlatform, _PATCHED, False):
        return
    choose = CpuPlatform.get_attn_backend_cls.__func__
    update_config = CpuPlatform.check_and_update_config.__func__
    register_specs = CpuPlatform.register_custom_kv_cache_specs.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if selected_backend == AttentionBackendEnum.CUSTOM and not attn_selector_config.use_mla:
            return AttentionBackendEnum.CUSTOM.get_path()
        return choose(cls, selected_backend, attn_selector_config, *args, **kwargs)

    def check_and_update_config(cls, vllm_config) -> None:
        update_config(cls, vllm_config)
        if uses_avl(vllm_config):
            from avl_compile.vllm_plugin.options import serving_options

            tp_size = vllm_config.parallel_config.tensor_parallel_size
            serving_options(vllm_config.additional_config, tp_size)
            cache_dtype = vllm_config.cache_config.cache_dtype
            if cache_dtype != "auto":
                raise ValueError(
                    f"avl vLLM plugin: kv_cache_dtype={cache_dtype!r} is not supported (A-VL "
                    "keeps its rows in the model's dtype); allowed: 'auto'"
                )
            if vllm_config.speculative_config is not None:
                raise ValueError(
                    "avl vLLM plugin: speculative_config is not supported (A-VL decodes one "
                    "token per step and gives evicted rows' blocks back); remove it"
                )

    def register_custom_kv_cache_specs(cls, vllm_config) -> None:
        register_specs(cls, vllm_config)
        from avl_compile.vllm_plugin.kv_manager import register_spec

        register_spec()  # A-VL's spec and manager (``kv_manager``)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    CpuPlatform.register_custom_kv_cache_specs = classmethod(register_custom_kv_cache_specs)
    setattr(CpuPlatform, _PATCHED, True)


def uses_avl(vllm_config) -> bool:
    """Whether an engine's configuration asks for the CUSTOM backend (A-VL's)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    attention = getattr(vllm_config, "attention_config", None)
    return getattr(attention, "backend", None) == AttentionBackendEnum.CUSTOM
