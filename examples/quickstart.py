"""Generate with and without the ``avl`` backend on a tiny random LLaVA and compare.

    python examples/quickstart.py [--inner inductor|aot_eager|eager] [--new-tokens 24]

Prints both answers and, per decoder layer, how many KV rows each cache keeps.
"""

from __future__ import annotations

import argparse

import torch

import avl_compile
from avl_compile.cache import generated_cache
from avl_compile.tiny_models import llava_prompt, tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()

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
    print(f"prompt: {prompt_len} tokens, {prompt.image_tokens} of them image tokens")
    print("dense answer:", dense.sequences[0, prompt_len:].tolist())
    print("avl answer:  ", compiled.sequences[0, prompt_len:].tolist())
    new_dense, new_avl = dense.sequences[0, prompt_len:], compiled.sequences[0, prompt_len:]
    same = (new_dense == new_avl).float().mean().item()
    print(f"new tokens equal to dense: {same:.0%} (random weights: no learned attention to keep)")
    dense_rows = generated_cache(dense).layers[0].keys.shape[2]
    for i, rows in enumerate(avl_compile.kv_rows_in_use(generated_cache(compiled))):
        print(f"layer {i}: KV rows kept {rows} of {dense_rows} ({rows / dense_rows:.0%})")


if __name__ == "__main__":
    main()
