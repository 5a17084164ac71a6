"""The grid-reading task and the bundled reader model trained on it."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from avl_compile.bench import reader_task as rt


def _pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@functools.lru_cache(maxsize=1)
def _bundled():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(rt.READER_MODEL_DIR)
    model = LlavaForConditionalGeneration.from_pretrained(rt.READER_MODEL_DIR).eval()
    return processor, model


def _generate(processor, model, examples: list[rt.ReaderExample]) -> list[str]:
    # the generic HF path of the bench: chat template, processor, greedy generate, decode
    prompts = [
        processor.apply_chat_template(_messages(e.question), add_generation_prompt=True)
        for e in examples
    ]
    inputs = processor(
        images=[e.image for e in examples], text=prompts, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=rt.READ_LEN + 2, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip().lower() for t in processor.batch_decode(new, skip_special_tokens=True)]


def test_examples_are_deterministic_per_seed_and_differ_across_seeds():
    a, b = rt.make_examples(8, 123), rt.make_examples(8, 123)
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b]
    assert [_pixels(e.image) for e in a] == [_pixels(e.image) for e in b]
    c = rt.make_examples(8, 124)
    assert [_pixels(e.image) for e in a] != [_pixels(e.image) for e in c]
    assert [e.answer for e in a] != [e.answer for e in c]


def test_answer_is_read_from_the_pixels():
    for example in rt.make_examples(16, rt.HELDOUT_SEED):
        assert example.image.size == (rt.IMAGE_SIZE, rt.IMAGE_SIZE)
        assert rt.read_cells_from_image(example.image, example.row, example.column) == (
            example.answer
        )
        # each cell is one solid patch: the evidence of answer token k is one image token
        pixels = torch.from_numpy(np.array(example.image))  # (64, 64, 3)
        cells = pixels.view(rt.GRID, rt.CELL, rt.GRID, rt.CELL, 3)
        assert bool((cells == cells[:, :1, :, :1]).all())
        assert len(example.answer.split()) == rt.READ_LEN


def test_processor_layout_matches_the_training_tensors():
    processor = rt.build_processor()
    examples = rt.make_examples(4, 7)
    prompts = [
        processor.apply_chat_template(_messages(e.question), add_generation_prompt=True)
        for e in examples
    ]
    inputs = processor(
        images=[e.image for e in examples], text=prompts, return_tensors="pt", padding=True
    )
    grids = torch.tensor([e.grid for e in examples])
    assert torch.equal(inputs["pixel_values"], rt.pixel_values_from_grids(grids))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ((ids == rt.IMAGE_TOKEN_ID).sum(1) == rt.NUM_IMAGE_TOKENS).all()
    assert len({int(m.sum()) for m in mask}) > 1  # different question lengths ...
    assert (mask[:, -1] == 1).all()  # ... padded on the left
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[0][mask[0] == 1].tolist())
    assert tokens[:4] == ["<s>", "user", ":", "<image>"]  # BOS and "USER:" before the image
    assert tokens[-2:] == ["assistant", ":"]


def test_bundled_model_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor, model = _bundled()
    text = model.config.text_config
    assert text.num_hidden_layers == 4
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vision_feature_select_strategy == "default"
    assert (rt.READER_MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 2**20
    assert model.generation_config.eos_token_id == rt.EOS_ID
    assert processor.tokenizer.padding_side == "left"
    assert (rt.READER_MODEL_DIR / "README.md").exists()


def test_bundled_model_reads_held_out_grids():
    processor, model = _bundled()
    examples = rt.make_examples(32, rt.HELDOUT_SEED)
    answers = _generate(processor, model, examples)
    accuracy = sum(a == e.answer for a, e in zip(answers, examples, strict=True)) / len(examples)
    assert accuracy >= 0.9, list(zip(answers, [e.answer for e in examples], strict=True))
    # left padding changes nothing: each prompt alone gives the batched answer
    for example, batched in list(zip(examples, answers, strict=True))[:3]:
        assert _generate(processor, model, [example]) == [batched]


def test_write_jsonl_dataset_round_trip(tmp_path):
    examples = rt.make_examples(5, 3)
    path = rt.write_jsonl_dataset(tmp_path / "reader", examples)
    assert path.name == "data.jsonl" and path.exists()
    records = rt.read_jsonl_dataset(tmp_path / "reader")
    assert len(records) == len(examples)
    for record, example in zip(records, examples, strict=True):
        assert record["question"] == example.question
        assert record["answers"] == [example.answer]
        assert _pixels(record["image"]) == _pixels(example.image)


@pytest.mark.parametrize("seed", [0, 5])
def test_training_batches_match_make_examples_rendering(seed):
    # training uses the tensor path: same pixels as the rendered PNG the bench would read
    grids, rows, columns, templates = rt.sample_grids(3, torch.Generator().manual_seed(seed))
    for grid, row, column in zip(grids, rows, columns, strict=True):
        image = rt.render_grid(grid)
        assert rt.read_cells_from_image(image, int(row), int(column)) == rt.answer_text(
            grid, int(row), int(column)
        )
    assert int(templates.max()) < len(rt.QUESTION_TEMPLATES)
