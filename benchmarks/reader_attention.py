"""Why A-VL loses accuracy on the bundled reader model: where its attention points.

    python benchmarks/reader_attention.py            # 40 examples for the ranks, 20 for the runs

1. For each decoder layer, how often the cell answer token k needs, (r, c + k), is among the
   top 50% of image tokens by the last prompt token's head-averaged attention (A-VL's
   secondary-set score), from eager attention with ``output_attentions``.
2. A-VL accuracy with S = 0.5 and every kept image row attended at every step, and with
   S = 1, C = 0.6 and a core refresh at every step: which half of the method loses accuracy.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from transformers import LlavaForConditionalGeneration

import avl_compile
from avl_compile.bench import evaluate, reader_task


def evidence_ranks(examples: int) -> torch.Tensor:
    model = LlavaForConditionalGeneration.from_pretrained(
        reader_task.READER_MODEL_DIR, attn_implementation="eager"
    )
    processor = reader_task.build_processor()
    hits = torch.zeros(model.config.text_config.num_hidden_layers, reader_task.READ_LEN)
    for example in reader_task.make_examples(examples, reader_task.HELDOUT_SEED):
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


def accuracy(options: dict, examples: int) -> float:
    model, processor = evaluate.load_model(reader_task.READER_MODEL_DIR, torch.float32, "cpu")
    avl_compile.compile(model, options={**options, "inner": "eager"})
    records = evaluate.load_examples(None, examples)
    hits = 0
    for record in records:
        inputs = evaluate.prompt_inputs(processor, record, "cpu")
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        text = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])[0]
        hits += evaluate.normalise_answer(text.replace("</s>", "")) == record["answers"][0]
    return hits / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank-examples", type=int, default=40)
    parser.add_argument("--run-examples", type=int, default=20)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    ranks = evidence_ranks(args.rank_examples)
    print("share of the cell answer token k needs in the layer's top 50% (rows: layer; cols: k)")
    for layer, row in enumerate(ranks.tolist()):
        print(f"  layer {layer}: " + "  ".join(f"k={k}: {v:.2f}" for k, v in enumerate(row)))
    for options in (
        {"vision_keep": 0.5, "vision_compute": 0.5, "refresh_every": -1},
        {"vision_keep": 1.0, "vision_compute": 0.6, "refresh_every": 1},
    ):
        print(f"A-VL {options}: accuracy {accuracy(options, args.run_examples):.2f}")


if __name__ == "__main__":
    main()
