"""Where a bundled model's attention points, and which half of A-VL loses accuracy on it.

    python benchmarks/reader_attention.py                  # the reader; 40 + 20 examples
    python benchmarks/reader_attention.py --model region-reader

1. For each decoder layer, how often the cell colour token k needs, (r, c + k), is among the
   top 50% of image tokens by the last prompt token's head-averaged attention (A-VL's
   secondary-set score), from eager attention with ``output_attentions``.
2. A-VL accuracy at the default options (S = 0.5, C = 0.3, K = 3), with a core refresh at
   every step (K = 1), with S = 0.5 and every kept image row attended at every step (C = S,
   K = -1), and with S = 1, C = 0.6, K = 1: which half of the method loses accuracy.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from transformers import LlavaForConditionalGeneration

import avl_compile
from avl_compile.bench import evaluate, reader_task


def evidence_ranks(name: str, examples: int) -> torch.Tensor:
    folder, task = reader_task.BUNDLED_MODELS[name]
    model = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
    processor = reader_task.build_processor()
    hits = torch.zeros(model.config.text_config.num_hidden_layers, reader_task.READ_LEN)
    for example in reader_task.make_examples(examples, reader_task.HELDOUT_SEED, task):
        record = {"image": example.image, "question": example.question}
        inputs = evaluate.prompt_inputs(processor, record, "cpu")
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
        image = (inputs["input_ids"][0] == reader_task.IMAGE_TOKEN_ID).nonzero().flatten()
        for layer, attention in enumerate(attentions):
            score = attention[0, :, -1, :].mean(0)[image]
            top = set(score.topk(image.numel() // 2).indices.tolist())
            for k in range(reader_task.READ_LEN):
                cell = reader_task.GRID * example.row + example.column + k
                hits[layer, k] += cell in top
    return hits / examples


def accuracy(name: str, options: dict | None, examples: int) -> float:
    """Exact match of A-VL with ``options`` (None: the uncompiled model) on the first examples."""
    folder, task = reader_task.BUNDLED_MODELS[name]
    model, processor = evaluate.load_model(folder, torch.float32, "cpu")
    if options is not None:
        avl_compile.compile(model, options={**options, "inner": "eager"})
    records = evaluate.load_examples(None, examples, task)
    hits = 0
    for record in records:
        inputs = evaluate.prompt_inputs(processor, record, "cpu")
        new_tokens = reader_task.answer_length(task) + 1
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        text = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])[0]
        hits += evaluate.normalise_answer(text.replace("</s>", "")) == record["answers"][0]
    return hits / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reader", choices=["reader", "region-reader"])
    parser.add_argument("--rank-examples", type=int, default=40)
    parser.add_argument("--run-examples", type=int, default=20)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    ranks = evidence_ranks(args.model, args.rank_examples)
    print("share of the cell colour token k needs in the layer's top 50% (rows: layer; cols: k)")
    for layer, row in enumerate(ranks.tolist()):
        print(f"  layer {layer}: " + "  ".join(f"k={k}: {v:.2f}" for k, v in enumerate(row)))
    for options in (
        {"vision_keep": 0.5, "vision_compute": 0.3, "refresh_every": 3},  # the defaults
        {"vision_keep": 0.5, "vision_compute": 0.3, "refresh_every": 1},
        {"vision_keep": 0.5, "vision_compute": 0.5, "refresh_every": -1},
        {"vision_keep": 1.0, "vision_compute": 0.6, "refresh_every": 1},
    ):
        print(f"A-VL {options}: accuracy {accuracy(args.model, options, args.run_examples):.2f}")
    print(f"dense (uncompiled): accuracy {accuracy(args.model, None, args.run_examples):.2f}")


if __name__ == "__main__":
    main()
