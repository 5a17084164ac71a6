"""The grid tasks and the bundled models trained on them (reader, region-reader, finder)."""

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


@functools.lru_cache(maxsize=len(rt.BUNDLED_MODELS))
def _bundled(name: str):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder, _ = rt.BUNDLED_MODELS[name]
    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    return processor, model


def _generate(processor, model, examples: list[rt.ReaderExample], task: str) -> list[str]:
    # the generic HF path of the bench: chat template, processor, greedy generate, decode
    prompts = [
        processor.apply_chat_template(_messages(e.question), add_generation_prompt=True)
        for e in examples
    ]
    inputs = processor(
        images=[e.image for e in examples], text=prompts, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=rt.answer_length(task) + 2, do_sample=False)
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


def test_count_read_answer_counts_the_distinct_colours_read_from_the_pixels():
    counts = set()
    for example in rt.make_examples(64, rt.HELDOUT_SEED, "count-read"):
        colours = rt.read_cells_from_image(example.image, example.row, example.column)
        count = len(set(colours.split()))
        assert example.answer == f"{count} {colours}"
        counts.add(count)
    assert counts >= {2, 3, 4}  # the count really varies (1 has probability 1/512)
    # the same seed gives the same grids and questions in both tasks
    read = rt.make_examples(4, 9)
    count_read = rt.make_examples(4, 9, "count-read")
    assert [e.question for e in read] == [e.question for e in count_read]
    assert [e.answer for e in read] == [e.answer.split(" ", 1)[1] for e in count_read]
    with pytest.raises(ValueError, match="task must be one of read, count-read, find"):
        rt.make_examples(1, 0, "count")


def test_find_examples_have_one_marker_and_its_position_is_the_answer():
    a, b = rt.make_examples(8, 123, "find"), rt.make_examples(8, 123, "find")
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b]
    assert [_pixels(e.image) for e in a] == [_pixels(e.image) for e in b]
    c = rt.make_examples(8, 124, "find")
    assert [_pixels(e.image) for e in a] != [_pixels(e.image) for e in c]
    examples = rt.make_examples(64, rt.HELDOUT_SEED, "find")
    for example in examples:
        assert example.question in rt.FIND_TEMPLATES  # no position in the question
        assert rt.find_cells_from_image(example.image) == [(example.row, example.column)]
        assert example.answer == f"{example.row} {example.column}"
        assert sum(cell == rt.MARKER_INDEX for line in example.grid for cell in line) == 1
        assert len(example.answer.split()) == rt.answer_length("find")
    # the marker really moves around, and every phrasing is used
    assert len({e.row for e in examples}) > 8 and len({e.column for e in examples}) > 8
    assert {e.question for e in examples} == set(rt.FIND_TEMPLATES)
    # its held-out grids are not the read tasks' grids of the same seed
    read = rt.make_examples(64, rt.HELDOUT_SEED)
    assert not {_pixels(e.image) for e in read} & {_pixels(e.image) for e in examples}


def test_find_vocabulary_extends_the_reading_vocabulary():
    read, find = rt.vocabulary(), rt.vocabulary("find")
    assert find[: len(read)] == read  # shared words keep their ids
    assert rt.vocabulary("count-read") == read
    assert rt.build_config(task="find").text_config.vocab_size == len(find)
    assert rt.build_config().text_config.vocab_size == len(read)
    tokenizer = rt.build_tokenizer("find")
    for example in rt.make_examples(16, 3, "find"):
        text = f"{example.question} {example.answer}"
        assert rt.UNK_ID not in tokenizer(text)["input_ids"]
    # the reading tokenizer does not know the finder's words
    assert rt.UNK_ID in rt.build_tokenizer()(rt.FIND_TEMPLATES[1])["input_ids"]


@pytest.mark.parametrize("seed", [0, 5])
def test_find_training_batches_match_make_examples_rendering(seed):
    grids, rows, columns, templates = rt.sample_grids(
        4, torch.Generator().manual_seed(seed), "find"
    )
    assert ((grids == rt.MARKER_INDEX).flatten(1).sum(1) == 1).all()
    for grid, row, column in zip(grids, rows, columns, strict=True):
        image = rt.render_grid(grid)
        assert rt.find_cells_from_image(image) == [(int(row), int(column))]
        assert rt.answer_text(grid, int(row), int(column), "find") == f"{int(row)} {int(column)}"
    assert int(templates.max()) < len(rt.FIND_TEMPLATES)


@pytest.mark.parametrize("task", rt.TASKS)
def test_processor_layout_matches_the_training_tensors(task):
    processor = rt.build_processor(task)
    examples = rt.make_examples(4, 7, task)
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


@pytest.mark.parametrize("name", list(rt.BUNDLED_MODELS))
def test_bundled_model_loads_offline(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, _ = rt.BUNDLED_MODELS[name]
    processor, model = _bundled(name)
    text = model.config.text_config
    assert text.num_hidden_layers == 4
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vision_feature_select_strategy == "default"
    assert (folder / "model.safetensors").stat().st_size <= 20 * 2**20
    assert model.generation_config.eos_token_id == rt.EOS_ID
    assert processor.tokenizer.padding_side == "left"
    assert (folder / "README.md").exists()


# (whole answer, the four colours) exact match: the region reader's misses are in its count
# (cards: 100% and 86% whole answers on 256 held-out examples, colours 100% for both);
# the finder's answer is the marker's row and column, both parts of the whole answer
MIN_ACCURACY = {"reader": (0.9, 0.9), "region-reader": (0.75, 0.9), "finder": (0.9, 0.9)}


@pytest.mark.parametrize("name", list(rt.BUNDLED_MODELS))
def test_bundled_model_reads_held_out_grids(name):
    _, task = rt.BUNDLED_MODELS[name]
    processor, model = _bundled(name)
    examples = rt.make_examples(32, rt.HELDOUT_SEED, task)
    answers = _generate(processor, model, examples, task)
    pairs = list(zip(answers, [e.answer for e in examples], strict=True))
    whole = sum(a == e for a, e in pairs) / len(pairs)
    colours = sum(a.split()[-rt.READ_LEN :] == e.split()[-rt.READ_LEN :] for a, e in pairs)
    colours /= len(pairs)
    min_whole, min_colours = MIN_ACCURACY[name]
    assert whole >= min_whole and colours >= min_colours, pairs
    # left padding changes nothing: each prompt alone gives the batched answer
    for example, batched in list(zip(examples, answers, strict=True))[:3]:
        assert _generate(processor, model, [example], task) == [batched]


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
