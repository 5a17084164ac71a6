"""The static-cache path (``cache_implementation="static"`` + ``CompileConfig``) is refused
with an error that says what to use instead: A-VL evicts rows, a static cache cannot."""

import pytest
from transformers import CompileConfig

from avl_compile.tiny_models import llava_prompt, tiny_llava


def test_static_cache_generate_is_refused_with_a_clear_error():
    model = tiny_llava()
    prompt = llava_prompt(model, [[1, 5, 6]], [[7, 8, 9]])
    config = CompileConfig(backend="avl", options={"inner": "eager"}, mode=None)
    config._compile_all_devices = True  # transformers compiles on GPUs only by default
    with pytest.raises(Exception, match="static KV cache") as caught:
        model.generate(
            **prompt.inputs, max_new_tokens=4, do_sample=False,
            cache_implementation="static", compile_config=config,
        )  # fmt: skip
    assert "avl_compile.compile" in str(caught.value)
