"""A synthetic visual-reading task and the builders of the small LLaVA trained on it.

The image is a 16x16 grid of solid coloured cells, 4x4 pixels each (64x64 pixels), so one
cell is exactly one 4x4 vision patch and one image token. The question names a row ``r`` and
a start column ``c``; the answer is the colours of cells ``(r, c), (r, c+1), (r, c+2),
(r, c+3)`` as four words. Answer token ``k`` therefore needs the evidence of one specific image
token, and that token moves one position to the right from one answer token to the next:
exactly the access pattern a KV-cache compression of image tokens has to preserve.

Two tasks share the images, questions and vocabulary:
- ``"read"`` (the bundled ``reader`` model): the answer is the four colours.
- ``"count-read"`` (the bundled ``region-reader`` model): the answer starts with the number
  of distinct colours among the four cells, then the four colours. The token that predicts the
  count (the last prompt token) needs the whole region at once, as an LVLM's question token
  attends to the region its question is about; the colour tokens then need one cell each and
  move along the row as before. The ``read`` model's last prompt token needs only the first
  cell, so nothing at the end of its prompt points at the later evidence: the two models bracket
  A-VL's premise (the prompt's end ranks the image tokens the answer will need).

A third task is of a different kind, visual search (the bundled ``finder`` model):
- ``"find"``: every cell has one of the seven colours other than white (``MARKER``) except
  exactly one white cell; the question only asks where the white cell is (``FIND_TEMPLATES``,
  no position in it) and the answer is its row and column as two numbers, e.g. ``5 11``. The
  evidence is found by its content, not at a position the question names: both answer tokens
  (and the last prompt token that predicts the first) need the one image token ``16 r + c``,
  which sits anywhere in the image. Its questions add a few words to the vocabulary
  (``vocabulary("find")``); the other tasks' tokenizer and config are unchanged.

Splits: training batches are drawn on the fly from ``torch.Generator().manual_seed(seed)``
(``sample_grids``; ``examples/train_reader.py --seed``, default ``TRAIN_SEED``), the held-out
split is ``make_examples(n, HELDOUT_SEED, task)`` which uses a different generator
(``random.Random``) and seed; two identical 256-cell grids have probability 8**-256
(``find``: 7**-255 per marker position).

Prompt layout (LLaVA-1.5): ``<s> USER: <image>*256 {question} ASSISTANT: {answer} </s>``;
BOS and ``USER:`` before the image act as the attention sink.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import torch
from PIL import Image

GRID = 16  # cells per side
CELL = 4  # pixels per cell side == vision patch size
IMAGE_SIZE = GRID * CELL
PATCH_SIZE = CELL
NUM_IMAGE_TOKENS = GRID * GRID  # "default" strategy drops CLS: one token per cell
READ_LEN = 4  # cells read per question
TRAIN_SEED = 0
HELDOUT_SEED = 1_000_003

TASKS = ("read", "count-read", "find")

# Bundled trained models (weights, config, tokenizer, processor, card) and their tasks.
READER_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "reader"
REGION_READER_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "region_reader"
FINDER_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "finder"
BUNDLED_MODELS: dict[str, tuple[Path, str]] = {
    "reader": (READER_MODEL_DIR, "read"),
    "region-reader": (REGION_READER_MODEL_DIR, "count-read"),
    "finder": (FINDER_MODEL_DIR, "find"),
}

# Saturated, well separated colours: a cell's colour is recoverable from any of its pixels.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = list(COLOURS)
MARKER = "white"  # task "find": the colour of the one cell to find
MARKER_INDEX = COLOUR_NAMES.index(MARKER)
BACKGROUND = [i for i in range(len(COLOURS)) if i != MARKER_INDEX]  # "find": the other cells

# Several phrasings of different lengths, so batched prompts really need left padding.
QUESTION_TEMPLATES = (
    "row {r} column {c}",
    "read row {r} from column {c}",
    "what colours are in row {r} from column {c} ?",
    "name the four colours of row {r} starting at column {c}",
)
# Task "find": no position in the question (the answer is the marker's row and column).
FIND_TEMPLATES = (
    "find the white cell",
    "where is the white cell ?",
    "row and column of the white cell",
    "which row and column is the white cell in ?",
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_TOKEN_ID = range(5)

# LLaVA-1.5 layout: "USER: <image>\n{question} ASSISTANT:" (BOS comes from the tokenizer).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}USER: {% else %}ASSISTANT: {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}<image>\n{% endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' %} {% else %}</s>{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


@dataclasses.dataclass
class ReaderExample:
    image: Image.Image
    question: str
    answer: str
    grid: list[list[int]]  # colour index per cell, [row][column]
    row: int  # "find": the marker's row and column
    column: int


# ---------------------------------------------------------------------------------------------
# Examples


def render_grid(grid: list[list[int]] | torch.Tensor) -> Image.Image:
    """The 64x64 RGB image of a ``GRID x GRID`` grid of colour indices."""
    cells = torch.as_tensor(grid, dtype=torch.long)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.uint8)
    pixels = palette[cells].repeat_interleave(CELL, 0).repeat_interleave(CELL, 1)
    return Image.fromarray(pixels.numpy(), mode="RGB")


def templates(task: str = "read") -> tuple[str, ...]:
    return FIND_TEMPLATES if check_task(task) == "find" else QUESTION_TEMPLATES


def question_text(template: int, row: int, column: int, task: str = "read") -> str:
    return templates(task)[template].format(r=row, c=column)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def answer_text(
    grid: list[list[int]] | torch.Tensor, row: int, column: int, task: str = "read"
) -> str:
    if check_task(task) == "find":
        return f"{row} {column}"
    cells = [int(grid[row][column + k]) for k in range(READ_LEN)]
    colours = " ".join(COLOUR_NAMES[cell] for cell in cells)
    if task == "count-read":
        return f"{len(set(cells))} {colours}"
    return colours


def answer_length(task: str) -> int:
    """Answer tokens before the end-of-sequence token."""
    if check_task(task) == "find":
        return 2  # row, column
    return READ_LEN + (check_task(task) == "count-read")


def make_examples(n: int, seed: int, task: str = "read") -> list[ReaderExample]:
    """``n`` examples, a pure function of ``seed`` (see the module docstring for splits)."""
    if check_task(task) == "find":
        return _make_find_examples(n, seed)
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        grid = [[rng.randrange(len(COLOURS)) for _ in range(GRID)] for _ in range(GRID)]
        row = rng.randrange(GRID)
        column = rng.randrange(GRID - READ_LEN + 1)
        template = rng.randrange(len(QUESTION_TEMPLATES))
        examples.append(
            ReaderExample(
                image=render_grid(grid),
                question=question_text(template, row, column),
                answer=answer_text(grid, row, column, task),
                grid=grid,
                row=row,
                column=column,
            )
        )
    return examples


def _make_find_examples(n: int, seed: int) -> list[ReaderExample]:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        grid = [[rng.choice(BACKGROUND) for _ in range(GRID)] for _ in range(GRID)]
        row, column = rng.randrange(GRID), rng.randrange(GRID)
        grid[row][column] = MARKER_INDEX
        template = rng.randrange(len(FIND_TEMPLATES))
        examples.append(
            ReaderExample(
                image=render_grid(grid),
                question=question_text(template, row, column, "find"),
                answer=answer_text(grid, row, column, "find"),
                grid=grid,
                row=row,
                column=column,
            )
        )
    return examples


def read_cells_from_image(image: Image.Image, row: int, column: int, count: int = READ_LEN) -> str:
    """Reads the answer back from the pixels (nearest palette colour of each cell's centre)."""
    rgb = image.convert("RGB")
    names = []
    for k in range(count):
        x, y = (column + k) * CELL + CELL // 2, row * CELL + CELL // 2
        pixel = rgb.getpixel((x, y))
        distance = {
            n: sum((a - b) ** 2 for a, b in zip(value, pixel, strict=True))
            for n, value in COLOURS.items()
        }
        names.append(min(distance, key=distance.__getitem__))
    return " ".join(names)


def find_cells_from_image(image: Image.Image, colour: str = MARKER) -> list[tuple[int, int]]:
    """The ``(row, column)`` of every cell whose centre is nearest to palette ``colour``."""
    return [
        (row, column)
        for row in range(GRID)
        for column in range(GRID)
        if read_cells_from_image(image, row, column, count=1) == colour
    ]


def write_jsonl_dataset(folder: str | Path, examples: list[ReaderExample]) -> Path:
    """PNG images plus ``data.jsonl`` lines ``{"image", "question", "answers"}``; returns it."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, example in enumerate(examples):
        relative = f"images/{i:05d}.png"
        example.image.save(folder / relative)  # PNG is lossless: pixels survive exactly
        record = {"image": relative, "question": example.question, "answers": [example.answer]}
        lines.append(json.dumps(record))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_jsonl_dataset(folder: str | Path) -> list[dict[str, Any]]:
    """The records of ``write_jsonl_dataset`` with ``image`` opened as a PIL image."""
    folder = Path(folder)
    records = []
    for line in (folder / "data.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            with Image.open(folder / record["image"]) as image:
                record["image"] = image.convert("RGB")
            records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# Fast tensor path for training (checked against the processor in the tests)


def sample_grids(
    n: int, generator: torch.Generator, task: str = "read"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random grids ``(n, GRID, GRID)``, rows, start columns and template ids
    (``find``: the marker's rows and columns, ids into ``FIND_TEMPLATES``)."""
    if check_task(task) == "find":
        background = torch.tensor(BACKGROUND)
        grids = background[torch.randint(len(BACKGROUND), (n, GRID, GRID), generator=generator)]
        rows = torch.randint(GRID, (n,), generator=generator)
        columns = torch.randint(GRID, (n,), generator=generator)
        grids[torch.arange(n), rows, columns] = MARKER_INDEX
        templates = torch.randint(len(FIND_TEMPLATES), (n,), generator=generator)
        return grids, rows, columns, templates
    grids = torch.randint(len(COLOURS), (n, GRID, GRID), generator=generator)
    rows = torch.randint(GRID, (n,), generator=generator)
    columns = torch.randint(GRID - READ_LEN + 1, (n,), generator=generator)
    templates = torch.randint(len(QUESTION_TEMPLATES), (n,), generator=generator)
    return grids, rows, columns, templates


def pixel_values_from_grids(grids: torch.Tensor) -> torch.Tensor:
    """What the processor makes of ``render_grid(grid)``: (n, 3, 64, 64), mean/std 0.5."""
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0
    pixels = palette[grids].repeat_interleave(CELL, 1).repeat_interleave(CELL, 2)
    return ((pixels - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Tokenizer, processor, config


def _new_words(words: list[str], templates: tuple[str, ...]) -> list[str]:
    new: list[str] = []
    for template in templates:
        for word in template.replace("{r}", "").replace("{c}", "").split():
            if word not in words and word not in new:
                new.append(word)
    return new


def vocabulary(task: str = "read") -> list[str]:
    """The tokenizer's words; ``find`` appends the words of its questions, so the ids of the
    words the tasks share are the same."""
    words = ["user", "assistant", ":", "?"]
    words += _new_words(words, QUESTION_TEMPLATES)
    words += [str(i) for i in range(GRID)] + COLOUR_NAMES
    if check_task(task) == "find":
        words += _new_words(words, FIND_TEMPLATES)
    return list(SPECIAL_TOKENS) + words


def build_tokenizer(task: str = "read"):
    """Word-level fast tokenizer: lower-cased, whitespace/punctuation split, BOS prepended."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary(task))}
    assert vocab["<image>"] == IMAGE_TOKEN_ID and vocab["</s>"] == EOS_ID
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    core.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=512,
    )


def build_image_processor():
    from transformers import CLIPImageProcessorPil

    # Resizing/cropping 64x64 to 64x64 is the identity, so pixels reach the model unchanged.
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def build_processor(task: str = "read"):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(task),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        # CLIP adds a CLS token that "default" drops again: 256 tokens in the prompt
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )


def build_config(
    text_hidden: int = 128,
    text_layers: int = 4,
    text_intermediate: int = 384,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_intermediate: int = 256,
    task: str = "read",
):
    """LLaVA config: CLIP-style tower, 2-layer MLP projector, Llama decoder with GQA (4q/2kv);
    ``task`` sets the vocabulary size (``vocabulary(task)``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocabulary(task)),
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=NUM_IMAGE_TOKENS,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    return config
