"""The backend on a tiny random LLaVA through ``generate``: the two oracles of the project."""

import pytest
import torch

import avl_compile
from avl_compile.tiny_models import llava_prompt, tiny_llava

FULL = {"vision_keep": 1.0, "vision_compute": 1.0, "text_keep": 1.0}
NEW_TOKENS = 32


def _generate(model, prompt, **kwargs):
    return model.generate(
        **prompt.inputs,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        min_new_tokens=NEW_TOKENS,
        return_dict_in_generate=True,
        **kwargs,
    )


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_full_budgets_generate_exactly_the_uncompiled_tokens(inner):
    prompt = llava_prompt(tiny_llava(), [[1, 5, 6]], [[7, 8, 9, 10]])
    expected = _generate(tiny_llava(), prompt).sequences
    model = avl_compile.compile(tiny_llava(), options={**FULL, "inner": inner})
    got = _generate(model, prompt)
    assert torch.equal(got.sequences, expected)
    counters = model._avl_backend.runtime.counters
    assert counters["prefill_sites"] == 3  # every decoder layer went through the policy
    assert counters["decode_sites"] == 3 * (NEW_TOKENS - 1)
