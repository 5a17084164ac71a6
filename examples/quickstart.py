"""Generate with and without the ``avl`` backend on a tiny random LLaVA and compare.

    python examples/quickstart.py [--inner inductor|aot_eager|eager] [--new-tokens 24]

Prints what the backend did (layers rewritten, decode steps in the compiled graph, rows
attended, KV rows kept per layer), then both answers and why they differ.
"""

from __future__ import annotations

import argparse

import torch

import avl_compile
from avl_compile.cache import generated_cache
from avl_compile.console import hide_library_notices
from avl_compile.diff import describe_policy
from avl_compile.tiny_models import llava_prompt, tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    hide_library_notices()  # Dynamo's note on transformers' image check: harmless here

    prompt = llava_prompt(tiny_llava(), [[1, 5, 6, 7]], [[8, 9, 10, 11, 12, 13]])
    settings = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
    )

    dense = tiny_llava().generate(**prompt.inputs, **settings)
    model = avl_compile.compile(tiny_llava(), options={"inner": args.inner})
    with torch.no_grad():
        compiled = model.generate(**prompt.inputs, **settings)

    prompt_len = prompt.inputs["input_ids"].shape[1]
    counters = model._avl_backend.runtime.counters
    steps = args.new_tokens - 1  # the first new token comes from the prefill
    layers = counters["prefill_sites"]
    dense_rows = generated_cache(dense).layers[0].keys.shape[2]
    policy = describe_policy(model._avl_backend.options)
    print(
        f"avl on a tiny random LLaVA: a prompt of {prompt_len} tokens ({prompt.image_tokens} "
        f"image tokens), {args.new_tokens} new tokens, {policy}"
    )
    print(f"what the backend did: rewrote the attention of {layers} decoder layers;")
    print(
        f"  decode: {counters['decode_graphs_in_graph']} of {steps} steps ran inside the compiled "
        f"graph, attending {counters['attended_rows'] / max(counters['decode_sites'], 1):.0f} "
        f"rows per layer and step on average (dense: {prompt_len + 1} to {dense_rows})"
    )
    for i, rows in enumerate(avl_compile.kv_rows_in_use(generated_cache(compiled))):
        print(f"  layer {i}: KV rows kept {rows} of {dense_rows} ({rows / dense_rows:.0%})")
    new_dense, new_avl = dense.sequences[0, prompt_len:], compiled.sequences[0, prompt_len:]
    same = (new_dense == new_avl).float().mean().item()
    print(
        f"answers: {same:.0%} of the new tokens equal dense. The weights are random, so no "
        "attention pattern means anything and dropping rows changes the text; on a trained "
        "model the kept rows carry the answer (avl-bench measures it)."
    )
    print("  dense:", new_dense.tolist())
    print("  avl:  ", new_avl.tolist())


if __name__ == "__main__":
    main()
