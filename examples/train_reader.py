"""Train the small LLaVA "reader" from scratch on the grid-reading task, on CPU.

    python examples/train_reader.py --out avl_compile/models/reader
    python examples/train_reader.py --task count-read --out avl_compile/models/region_reader
    python examples/train_reader.py --task find --out avl_compile/models/finder --threads 1

Recipe. A jointly initialised tiny LLaVA trained on the answer loss alone stays at chance: the
answer's gradient reaches the right image token only through near-uniform attention over 256
tokens, and the question's row/column must first be gathered at the answer positions. So:

1. Vision warm-up: the CLIP tower alone, with throw-away per-patch linear heads predicting the
   cell's colour, row and column. Afterwards the features carry "what" and "where" linearly.
2. Joint training of tower + projector + Llama on the answer tokens (next-token loss on the
   four colour words and EOS) plus three throw-away auxiliary losses:
   - the per-patch vision heads (weight ``--aux-weight``), so the features stay readable;
   - "where" heads on the input of the last decoder layer (``--where-weight``): image tokens
     predict their own row/column/colour, and the position that predicts answer token ``k``
     predicts the row/column of the cell it needs, ``(r, c + k)``; shared heads align queries
     with keys;
   - attention supervision (``--attn-weight``): query head 0 of the last layer should attend
     to image token ``16 r + c + k`` at that position (``count-read``: the position that
     predicts the count should spread it evenly over the four cells, the colour positions
     attend one cell each as in ``read``; ``find``: both answer positions attend the white
     cell ``16 r + c``, and the "where" heads of both predict its row/column).
   The answer loss sits at chance until the attention locks on (~200 steps), then drops to
   near zero within ~30 steps. The auxiliary heads are dropped; the saved model is a plain
   ``LlavaForConditionalGeneration``.

Held-out accuracy is measured at the end through the generic Hugging Face path the bench uses
(chat template, processor, greedy ``generate``, ``batch_decode``), and the artefacts plus a
model card are written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# Sleep rather than spin in idle OpenMP threads: on a shared 2-core machine spinning threads
# slowed a step tenfold. Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from avl_compile.bench import reader_task as rt  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="read", choices=rt.TASKS)
    parser.add_argument("--out", default=None, help="default: the bundled model of --task")
    parser.add_argument("--seed", type=int, default=rt.TRAIN_SEED)
    parser.add_argument("--minutes", type=float, default=33.0, help="wall-clock cap, training")
    parser.add_argument("--vision-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1200, help="joint training steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--projector-lr", type=float, default=4e-3)
    parser.add_argument("--vision-lr", type=float, default=1e-3)
    parser.add_argument("--aux-weight", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--attn-weight", type=float, default=1.0, help="attention supervision")
    parser.add_argument("--attn-layer", type=int, default=-1)
    parser.add_argument("--where-weight", type=float, default=1.0, help="deep supervision")
    parser.add_argument("--eval-n", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--no-save", action="store_true", help="exploration runs")
    return parser.parse_args(argv)


class PatchHeads(torch.nn.Module):
    """Per-patch colour / row / column classifiers on the tower's last hidden state."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.colour = torch.nn.Linear(width, len(rt.COLOURS))
        self.row = torch.nn.Linear(width, rt.GRID)
        self.column = torch.nn.Linear(width, rt.GRID)
        cells = torch.arange(rt.NUM_IMAGE_TOKENS)
        self.register_buffer("rows", cells // rt.GRID, persistent=False)
        self.register_buffer("columns", cells % rt.GRID, persistent=False)

    def loss(self, features: torch.Tensor, grids: torch.Tensor) -> tuple[torch.Tensor, float]:
        n = features.shape[0]
        colour = self.colour(features).flatten(0, 1)
        row = self.row(features).flatten(0, 1)
        column = self.column(features).flatten(0, 1)
        colours = grids.flatten(1).flatten()
        rows, columns = self.rows.repeat(n), self.columns.repeat(n)
        loss = (
            F.cross_entropy(colour, colours)
            + F.cross_entropy(row, rows)
            + F.cross_entropy(column, columns)
        )
        correct = (
            (colour.argmax(-1) == colours)
            & (row.argmax(-1) == rows)
            & (column.argmax(-1) == columns)
        )
        return loss, correct.float().mean().item()


IMAGE_START = 3  # "<s> user :" precede the image tokens


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    # The same features LLaVA feeds its projector: last layer, CLS dropped ("default").
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[-1][:, 1:]


def encode_batch(tokenizer, grids, rows, columns, templates, task: str):
    """Right-padded ``prompt + answer + EOS`` rows; labels only on the answer and EOS.

    Right padding keeps positions 0.. for every row, as ``generate`` does for left padding.
    """
    image = "<image>" * rt.NUM_IMAGE_TOKENS
    sequences, starts = [], []
    for grid, row, column, template in zip(grids, rows, columns, templates, strict=True):
        question = rt.question_text(int(template), int(row), int(column), task)
        prompt = f"USER: {image}\n{question} ASSISTANT:"
        answer = rt.answer_text(grid, int(row), int(column), task)
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        sequences.append(prompt_ids + answer_ids + [rt.EOS_ID])
        starts.append(len(prompt_ids))
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), rt.PAD_ID)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for b, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention_mask[b, : len(seq)] = 1
        labels[b, start : len(seq)] = torch.tensor(seq[start:])
    return input_ids, attention_mask, labels


def pretrain_vision(model, heads: PatchHeads, args, generator: torch.Generator) -> None:
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    start = time.time()
    for step in range(1, args.vision_steps + 1):
        grids, *_ = rt.sample_grids(args.batch, generator)
        loss, acc = heads.loss(vision_features(model, rt.pixel_values_from_grids(grids)), grids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == args.vision_steps:
            print(
                f"vision {step:5d}  loss {loss.item():.3f}  patch acc {acc:.3f}  "
                f"{time.time() - start:6.0f}s",
                flush=True,
            )


class AttentionProbe:
    """Recomputes one decoder layer's attention logits for chosen query rows (SDPA hides them).

    Used to supervise one head: the query that predicts answer token ``k`` should look at image
    token ``16 r + c + k``. This hands the model the one thing it cannot find from the answer
    loss alone (where to look among 256 tokens) while the loss still trains what to do with it.
    """

    def __init__(self, model, layer: int) -> None:
        self.attn = model.model.language_model.layers[layer].self_attn
        width = model.config.text_config.hidden_size
        # throw-away "where" heads shared by image tokens (their cell) and answer queries
        # (the cell they need): aligns the two so a query can match its key linearly
        self.where = torch.nn.ModuleDict(
            {
                "row": torch.nn.Linear(width, rt.GRID),
                "column": torch.nn.Linear(width, rt.GRID),
                "colour": torch.nn.Linear(width, len(rt.COLOURS)),
            }
        )
        self.captured: dict = {}
        self.handle = self.attn.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.captured = {"hidden": hidden, "rope": kwargs["position_embeddings"]}

    def loss(
        self, query_pos: torch.Tensor, target_pos: torch.Tensor, head: int = 0
    ) -> torch.Tensor:
        """Cross-entropy of head ``head``'s attention at ``query_pos`` (B, K) to an even spread
        over ``target_pos`` (B, K, M) (repeat a position M times for a one-hot target)."""
        from transformers.models.llama.modeling_llama import rotate_half

        attn = self.attn
        hidden, (cos, sin) = self.captured["hidden"], self.captured["rope"]
        batch, length, _ = hidden.shape
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        d = attn.head_dim
        rows = torch.arange(batch)[:, None]
        q = attn.q_proj(hidden[rows, query_pos])[..., head * d : (head + 1) * d]
        kv_head = head // attn.num_key_value_groups
        k = attn.k_proj(hidden)[..., kv_head * d : (kv_head + 1) * d]
        q = q * cos[rows, query_pos] + rotate_half(q) * sin[rows, query_pos]
        k = k * cos + rotate_half(k) * sin
        logits = torch.einsum("bqd,btd->bqt", q, k) * attn.scaling
        causal = torch.arange(length)[None, None, :] > query_pos[..., None]
        logits = logits.masked_fill(causal, float("-inf"))
        log_probs = logits.log_softmax(-1).gather(-1, target_pos)
        return -log_probs.mean()

    def where_loss(
        self, query_pos: torch.Tensor, target_pos: torch.Tensor, grids: torch.Tensor
    ) -> torch.Tensor:
        """Row/column of the needed cell from the layer's input at queries and image tokens."""
        hidden = self.captured["hidden"]
        batch = hidden.shape[0]
        cells = torch.arange(rt.NUM_IMAGE_TOKENS)
        image = hidden[:, IMAGE_START : IMAGE_START + rt.NUM_IMAGE_TOKENS].flatten(0, 1)
        queries = hidden[torch.arange(batch)[:, None], query_pos].flatten(0, 1)
        wanted = (target_pos[..., 0] - IMAGE_START).flatten()  # the (first) cell needed
        image_cells = cells.repeat(batch)
        # image tokens and queries are averaged separately: 4 queries vs 256 image tokens
        # the colour must stay readable in the image tokens' values for the answer to copy it
        total = F.cross_entropy(self.where["colour"](image), grids.flatten())
        for states, cell in ((image, image_cells), (queries, wanted)):
            row, column = self.where["row"](states), self.where["column"](states)
            total = total + F.cross_entropy(row, cell // rt.GRID)
            total = total + F.cross_entropy(column, cell % rt.GRID)
        hit = (row.argmax(-1) == cell // rt.GRID) & (column.argmax(-1) == cell % rt.GRID)
        self.query_acc = hit.float().mean().item()
        return total


def cells_needed_per_answer_token(task: str) -> torch.Tensor:
    """(answer tokens, READ_LEN) column offsets each answer token needs, repeated to width."""
    if task == "find":  # both numbers need the marker cell (r, c)
        return torch.zeros(rt.answer_length(task), rt.READ_LEN, dtype=torch.long)
    reads = torch.arange(rt.READ_LEN)[:, None].expand(-1, rt.READ_LEN)  # token k: cell c + k
    if task == "count-read":
        return torch.cat([torch.arange(rt.READ_LEN)[None], reads])  # the count needs all four
    return reads


def train_joint(model, heads: PatchHeads, tokenizer, args, generator, deadline: float) -> int:
    projector = list(model.model.multi_modal_projector.parameters())
    vision = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    language = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    groups = [
        {"params": projector, "lr": args.projector_lr},
        {"params": vision, "lr": args.vision_lr},
        {"params": language, "lr": args.lr},
    ]
    probe = AttentionProbe(model, args.attn_layer) if args.attn_weight > 0 else None
    cells_needed = cells_needed_per_answer_token(args.task)
    if probe is not None:
        groups.append({"params": list(probe.where.parameters()), "lr": args.lr})
    for group in groups:
        group["base_lr"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01, betas=(0.9, 0.98))
    start = time.time()
    step = 0
    for step in range(1, args.steps + 1):
        # linear warm-up, cosine decay to 5 %
        progress = step / args.steps
        scale = min(1.0, step / args.warmup) * (
            0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
        )
        for group in groups:
            group["lr"] = group["base_lr"] * scale
        grids, rows, columns, templates = rt.sample_grids(args.batch, generator, args.task)
        input_ids, attention_mask, labels = encode_batch(
            tokenizer, grids, rows, columns, templates, args.task
        )
        pixel_values = rt.pixel_values_from_grids(grids)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            output_hidden_states=False,
        )
        logits = out.logits[:, :-1]
        targets = labels[:, 1:]
        lm_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss = lm_loss
        attn_loss = where_loss = torch.zeros(())
        if probe is not None:
            # answer token j is predicted at (first answer position - 1 + j)
            first = (labels != -100).int().argmax(-1)
            query_pos = first[:, None] - 1 + torch.arange(cells_needed.shape[0])
            first_cell = IMAGE_START + rows * rt.GRID + columns
            target_pos = first_cell[:, None, None] + cells_needed
            attn_loss = probe.loss(query_pos, target_pos)
            loss = loss + args.attn_weight * attn_loss
            if args.where_weight > 0:
                where_loss = probe.where_loss(query_pos, target_pos, grids)
                loss = loss + args.where_weight * where_loss
        if args.aux_weight > 0:
            aux, _ = heads.loss(vision_features(model, pixel_values), grids)
            loss = loss + args.aux_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps:
            with torch.no_grad():
                mask = targets != -100
                hit = (logits.argmax(-1) == targets) | ~mask
                token_acc = (hit & mask).sum().item() / mask.sum().item()
                answer_acc = hit.all(-1).float().mean().item()
            print(
                f"joint {step:5d}  lm {lm_loss.item():.3f}  attn {attn_loss.item():.3f}  "
                f"where {where_loss.item():.3f}  "
                f"q-where {probe.query_acc if probe else 0:.2f}  token acc {token_acc:.3f}  "
                f"answer acc {answer_acc:.3f}  lr {scale * args.lr:.2e}  "
                f"{time.time() - start:6.0f}s",
                flush=True,
            )
        if time.time() > deadline:
            print(f"time cap reached after {step} joint steps", flush=True)
            break
    return step


@torch.no_grad()
def evaluate(model, processor, examples: list[rt.ReaderExample], task: str, batch: int = 32):
    """Dense greedy exact-match accuracy through the generic HF path; returns (acc, misses)."""
    model.eval()
    hits, misses = 0, []
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        prompts = [
            processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": e.question}],
                    }
                ],
                add_generation_prompt=True,
            )
            for e in chunk
        ]
        inputs = processor(
            images=[e.image for e in chunk], text=prompts, return_tensors="pt", padding=True
        )
        out = model.generate(**inputs, max_new_tokens=rt.answer_length(task) + 2, do_sample=False)
        texts = processor.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for example, text in zip(chunk, texts, strict=True):
            if text.strip().lower() == example.answer.strip().lower():
                hits += 1
            else:
                misses.append((example.question, example.answer, text))
    model.train()
    return hits / len(examples), misses


# The task paragraph of the card: how the question locates the evidence, then the answer.
TASK_QUESTION = {
    "read": """The question names a row `r` and a start
column `c` (four phrasings, e.g. `read row 5 from column 3`).""",
    "find": f"""Every cell has one of the seven colours other
than {rt.MARKER} except exactly one {rt.MARKER} cell `(r, c)`. The question names no position
(four phrasings, e.g. `{rt.FIND_TEMPLATES[1]}`).""",
}
TASK_QUESTION["count-read"] = TASK_QUESTION["read"]

TASK_TEXT = {
    "read": """The answer is the colours of
cells `(r, c) .. (r, c+3)`, e.g. `red blue white black`. Answer token `k` needs image token
`16 r + c + k`: the evidence moves by one image token per generated token.""",
    "count-read": """The answer is the number of
distinct colours among cells `(r, c) .. (r, c+3)`, then their colours, e.g.
`3 red blue white red`. The count needs the four image tokens `16 r + c .. 16 r + c + 3` at
once (from the last prompt token); colour token `k` then needs image token `16 r + c + k`:
the evidence moves by one image token per generated token.""",
    "find": """The answer is the row and column of the
white cell as two numbers, e.g. `5 11` (visual search: the evidence is found by its content,
not at a position the question names). Both answer tokens, and the last prompt token that
predicts the first, need the one image token `16 r + c`, which can be anywhere in the image.""",
}


def write_card(out: Path, info: dict) -> None:
    title = {"read": "grid reader", "count-read": "grid region reader", "find": "grid finder"}[
        info["task"]
    ]
    cores = f"{info['threads']} CPU core" + ("s" if info["threads"] != 1 else "")
    task_text = f"{TASK_QUESTION[info['task']]} {TASK_TEXT[info['task']]}"
    text = f"""# avl-compile {title} (tiny LLaVA, trained from scratch)

A {info["params"] / 1e6:.2f} M-parameter `LlavaForConditionalGeneration` (CLIP-style vision
tower, 2-layer MLP projector, 4-layer Llama decoder with grouped-query attention, 4 query /
2 KV heads, SDPA) trained from random initialisation on CPU for the avl-compile bench.

## Task

A 64x64 image is a 16x16 grid of solid cells (4x4 pixels, one vision patch each, so 256 image
tokens) in 8 colours ({", ".join(rt.COLOUR_NAMES)}). {task_text}
Prompt (LLaVA-1.5 layout): `<s> USER: <image>x256 {{question}} ASSISTANT:`.
Task code: `avl_compile/bench/reader_task.py`, task `{info["task"]}` (held-out split:
`make_examples(n, HELDOUT_SEED={rt.HELDOUT_SEED}, task="{info["task"]}")`; training batches
from `torch.Generator` seed {info["seed"]}).

## Training

```
{info["command"]}
```

Vision warm-up with per-patch colour/row/column heads ({info["vision_steps"]} steps), then joint
training ({info["steps"]} steps, batch {info["batch"]}, AdamW, LLM lr {info["lr"]}, projector lr
{info["projector_lr"]}, cosine schedule) on the answer tokens plus throw-away auxiliary losses:
the per-patch vision heads, "where" heads on the last decoder layer's input (image tokens:
their cell; answer positions: the cell they need) and supervision of one attention head of the
last layer towards the cells each answer token needs. See the docstring of
`examples/train_reader.py`. The auxiliary heads are not part of the saved model.
Wall time: {info["train_minutes"]:.1f} min on {cores} (torch {torch.__version__}).

## Accuracy

Dense greedy exact match (whole answer, after strip/lower) on {info["eval_n"]} held-out examples:
**{info["accuracy"]:.3f}**, measured through `apply_chat_template` -> processor ->
`generate(do_sample=False)` -> `batch_decode(skip_special_tokens=True)`.

Weights: `model.safetensors`, {info["weights_mb"]:.1f} MB (fp32).
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import LlavaForConditionalGeneration

    processor = rt.build_processor(args.task)
    config = rt.build_config(task=args.task)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.train()
    heads = PatchHeads(config.vision_config.hidden_size)
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {params / 1e6:.3f} M", flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    begin = time.time()
    deadline = begin + 60 * args.minutes
    pretrain_vision(model, heads, args, generator)
    steps = train_joint(model, heads, processor.tokenizer, args, generator, deadline)
    train_seconds = time.time() - begin
    print(f"training wall time: {train_seconds / 60:.1f} min", flush=True)

    heldout = rt.make_examples(args.eval_n, rt.HELDOUT_SEED, args.task)
    accuracy, misses = evaluate(model, processor, heldout, args.task)
    print(f"held-out greedy accuracy: {accuracy:.3f} (n={len(heldout)})", flush=True)
    for miss in misses[:5]:
        print("  miss:", miss)
    if args.no_save:
        return 0

    bundled = {task: folder for folder, task in rt.BUNDLED_MODELS.values()}
    out = Path(args.out or bundled[args.task])
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.bos_token_id = rt.BOS_ID
    model.generation_config.eos_token_id = rt.EOS_ID
    model.generation_config.pad_token_id = rt.PAD_ID
    model.save_pretrained(out)
    processor.save_pretrained(out)
    weights_mb = (out / "model.safetensors").stat().st_size / 2**20
    command = "python examples/train_reader.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    info = {
        **vars(args),
        "params": params,
        "steps": steps,
        "train_minutes": train_seconds / 60,
        "accuracy": accuracy,
        "eval_n": len(heldout),
        "weights_mb": weights_mb,
        "command": command.strip(),
    }
    write_card(out, info)
    (out / "training_log.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out} ({weights_mb:.1f} MB weights)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
