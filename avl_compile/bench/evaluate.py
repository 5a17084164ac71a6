"""The evaluation bench: accuracy, resident KV memory, attention work and decode speed of
each KV policy and budget, on one model and dataset, side by side in one run.

The model is compiled with the ``avl`` backend once per decode step the configurations need
(a decode graph holds one policy's step, and layers that evict nothing grow in it); between
``generate`` calls the budgets are switched with ``AvlBackend.set_options``, so every
configuration decodes with its own step compiled (except where the backend itself takes the
runtime-call graph: FastV on transformers before 5.23, see README).
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

import avl_compile
from avl_compile.cache import generated_cache
from avl_compile.options import AvlOptions
from avl_compile.policies import decode_variant

POLICIES = (
    "full", "avl", "avl-recall", "avl-pages", "avl-adaptive", "h2o", "streaming", "fastv", "random"
)  # fmt: skip
# past the paper (README): A-VL's budgets, a core re-picked at every step, and 8 pages of 8
# evicted image rows recalled from host memory before each step
AVL_RECALL = {"refresh_every": 1, "recall_pages": 8, "recall_page_size": 8}
# the recommended set (README): recall of 16 pages of 4 rows before every step, and the
# query-aware core (pages of 4 image tokens): attends sink + core + text at every step
AVL_PAGES = {"refresh_every": 1, "recall_pages": 16, "recall_page_size": 4, "core_page_size": 4}
# adaptive refresh (README): A-VL's budgets and K = 3, and a batch row also refreshes when
# its core's log-sum-exp falls 0.5 nats below its value at the last refresh
AVL_ADAPTIVE = {"refresh_lse_drop": 0.5}
# the rows that are A-VL's budgets plus an option set past the paper
AVL_OPTION_SETS = {"avl-recall": AVL_RECALL, "avl-pages": AVL_PAGES, "avl-adaptive": AVL_ADAPTIVE}
BUDGETS = (0.1, 0.25, 0.5, 0.75, 1.0)
CSV_COLUMNS = (
    "policy",
    "kv_budget",
    "accuracy",
    "kv_bytes_prefill",
    "kv_bytes_end",
    "kv_bytes_host",
    "attended_rows_per_step",
    "attended_share",
    "refreshes_per_token",
    "ms_per_token",
)
AVL_COMPUTE_SHARE = 0.6  # C / S of the paper's setting (0.3 / 0.5)


@dataclasses.dataclass
class BenchRow:
    """One (policy, budget) configuration, averaged over the examples (ms: median)."""

    policy: str
    kv_budget: float
    accuracy: float
    kv_bytes_prefill: float
    kv_bytes_end: float
    kv_bytes_host: float  # evicted rows kept in host memory (recall)
    attended_rows_per_step: float
    attended_share: float  # of the rows a full cache attends at the same steps
    refreshes_per_token: float  # decode steps that re-pick A-VL's core (per layer and token)
    ms_per_token: float

    def csv_row(self) -> dict[str, Any]:
        """Rounded to what the numbers mean: bytes whole, ms to 3 significant digits."""
        return {
            "policy": self.policy,
            "kv_budget": self.kv_budget,
            "accuracy": round(self.accuracy, 4),
            "kv_bytes_prefill": round(self.kv_bytes_prefill),
            "kv_bytes_end": round(self.kv_bytes_end),
            "kv_bytes_host": round(self.kv_bytes_host),
            "attended_rows_per_step": round(self.attended_rows_per_step, 1),
            "attended_share": round(self.attended_share, 3),
            "refreshes_per_token": round(self.refreshes_per_token, 3),
            "ms_per_token": float(f"{self.ms_per_token:.3g}"),
        }


def policy_options(
    policy: str, kv_budget: float, avl_refresh_every: int | None = None
) -> dict[str, Any]:
    """Backend options that give ``policy`` the KV budget ``kv_budget``.

    A-VL: S = budget of the image tokens kept, C = 0.6 S attended between refreshes, text
    budget T = budget (floor of 20 text rows), core re-picked every ``avl_refresh_every``
    steps (None: the backend's default, 3). "avl-recall", "avl-pages", "avl-adaptive": the
    same budgets with ``AVL_RECALL``, ``AVL_PAGES``, ``AVL_ADAPTIVE``. The baselines take
    ``kv_budget`` directly.
    """
    if policy == "full":
        return {"policy": "full"}
    if policy in AVL_OPTION_SETS:
        return {**policy_options("avl", kv_budget), **AVL_OPTION_SETS[policy]}
    if policy == "avl":
        options = {
            "policy": "avl",
            "vision_keep": kv_budget,
            "vision_compute": AVL_COMPUTE_SHARE * kv_budget,
            "text_keep": kv_budget,
        }
        if avl_refresh_every is not None:
            options["refresh_every"] = avl_refresh_every
        return options
    return {"policy": policy, "kv_budget": kv_budget}


def configurations(policies: Iterable[str], budgets: Iterable[float]) -> list[tuple[str, float]]:
    """(policy, budget) pairs; the full cache runs once, at budget 1.0."""
    budgets = list(budgets)
    pairs = []
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"avl bench: unknown policy {policy!r}; choose from {POLICIES}")
        pairs += [(policy, 1.0)] if policy == "full" else [(policy, b) for b in budgets]
    for budget in budgets:
        if not 0 < budget <= 1:
            raise ValueError(f"avl bench: budget {budget} is not a fraction in (0, 1]")
    return pairs


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().lower().split())


def load_model(name_or_path: str | Path, dtype: torch.dtype, device: str):
    """(model, processor) of a Hugging Face image-text-to-text checkpoint (id or folder)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype)
    return model.to(device).eval(), processor


def load_examples(
    data: str | Path | None, limit: int | None, task: str = "read"
) -> list[dict[str, Any]]:
    """Records ``{"image": PIL image, "question": str, "answers": [str]}``: from a folder
    holding ``data.jsonl`` (image paths relative to it), or by default the held-out split of
    the bundled reading task ``task`` (``reader_task.TASKS``)."""
    from avl_compile.bench import reader_task

    if data is None:
        examples = reader_task.make_examples(limit or 100, reader_task.HELDOUT_SEED, task)
        records = [
            {"image": e.image, "question": e.question, "answers": [e.answer]} for e in examples
        ]
    else:
        records = reader_task.read_jsonl_dataset(data)
    return records[:limit] if limit else records


def prompt_inputs(processor, record: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    content = [{"type": "image"}, {"type": "text", "text": record["question"]}]
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=record["image"], text=prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in inputs.items()}


class _TokenClock:
    """A generate streamer that only notes when each new token arrives."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt
            self._prompt_seen = True
            return
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def ms_per_token(self) -> float | None:
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) * 1e3 / (len(self.times) - 1)


def evaluate(
    model,
    processor,
    records: Sequence[dict[str, Any]],
    configs: Sequence[tuple[str, float]],
    max_new_tokens: int,
    inner: str = "eager",
    progress: bool = True,
    avl_refresh_every: int | None = None,
) -> list[BenchRow]:
    """Run every configuration over every record; returns one row per configuration."""
    from tqdm.auto import tqdm

    device = str(model.device)
    n_layers = model.config.get_text_config().num_hidden_layers
    inputs = [prompt_inputs(processor, record, device) for record in records]
    answers = [{normalise_answer(a) for a in record["answers"]} for record in records]

    def options(policy: str, budget: float) -> dict[str, Any]:
        return {**policy_options(policy, budget, avl_refresh_every), "inner": inner}

    # configurations that share a decode step run one after another: one compile each
    layers = list(range(n_layers))

    def decode_step_of(index: int) -> tuple[str, list[int]]:
        kind, growing = decode_variant(AvlOptions(**options(*configs[index])), layers)
        return kind, sorted(growing)

    order = sorted(range(len(configs)), key=decode_step_of)
    backend = None
    rows: dict[int, BenchRow] = {}
    bar = tqdm(total=len(configs) * len(records), disable=not progress, desc="avl bench")
    for index in order:
        policy, budget = configs[index]
        if backend is None or not backend.decode_graphs_serve(options(policy, budget)):
            # a decode graph holds one policy's step: compile for this one, and let Dynamo
            # see a few cache lengths before anything is timed
            backend = avl_compile.compile(model, options=options(policy, budget))._avl_backend
            for prompt in inputs[:2]:
                _generate(model, prompt, max_new_tokens, None)
        backend.set_options(options(policy, budget))
        counters = backend.runtime.counters
        correct, kv_prefill, kv_end, attended, dense_rows, ms = 0, [], [], [], [], []
        kv_host = []
        refreshes, decode_steps = 0, 0
        for prompt, expected in zip(inputs, answers, strict=True):
            before = dict(counters)
            clock = _TokenClock(device)
            output = _generate(model, prompt, max_new_tokens, clock)
            backend.runtime.collect_device_counts(generated_cache(output))
            new_tokens = output.sequences[:, prompt["input_ids"].shape[1] :]
            text = processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
            correct += normalise_answer(text) in expected
            kv_prefill.append(counters["prefill_kv_bytes"] - before.get("prefill_kv_bytes", 0))
            kv_end.append(_cache_bytes(generated_cache(output)))
            kv_host.append(
                counters["prefill_host_kv_bytes"] - before.get("prefill_host_kv_bytes", 0)
            )
            decode_sites = counters["decode_sites"] - before.get("decode_sites", 0)
            refreshes += counters["refresh_sites"] - before.get("refresh_sites", 0)
            decode_steps += decode_sites
            if decode_sites:
                rows_attended = counters["attended_rows"] - before.get("attended_rows", 0)
                attended.append(rows_attended * n_layers / decode_sites)
                # a full cache attends the prompt and every token so far, P + t + 1 rows at
                # step t, in every layer
                steps = decode_sites / n_layers
                dense_rows.append(n_layers * (prompt["input_ids"].shape[1] + (steps + 1) / 2))
            if clock.ms_per_token() is not None:
                ms.append(clock.ms_per_token())
            bar.update()
        rows[index] = BenchRow(
            policy=policy,
            kv_budget=budget,
            accuracy=correct / len(records),
            kv_bytes_prefill=statistics.fmean(kv_prefill),
            kv_bytes_end=statistics.fmean(kv_end),
            kv_bytes_host=statistics.fmean(kv_host),
            attended_rows_per_step=statistics.fmean(attended) if attended else float("nan"),
            attended_share=(
                statistics.fmean(attended) / statistics.fmean(dense_rows)
                if attended
                else float("nan")
            ),
            refreshes_per_token=refreshes / decode_steps if decode_steps else float("nan"),
            ms_per_token=statistics.median(ms) if ms else float("nan"),
        )
    bar.close()
    return [rows[index] for index in range(len(configs))]


def _generate(model, inputs: dict[str, torch.Tensor], max_new_tokens: int, streamer):
    return model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        return_dict_in_generate=True,
        streamer=streamer,
    )


def _cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def format_table(rows: Sequence[BenchRow]) -> str:
    from tabulate import tabulate

    table = [
        [
            r.policy,
            f"{r.kv_budget:.0%}",
            f"{r.accuracy:.1%}",
            f"{r.kv_bytes_prefill / 1024:.1f}",
            f"{r.kv_bytes_end / 1024:.1f}",
            f"{r.kv_bytes_host / 1024:.1f}",
            f"{r.attended_rows_per_step:.0f}",
            f"{r.attended_share:.0%}",
            f"{r.refreshes_per_token:.2f}",
            f"{r.ms_per_token:.3g}",
        ]
        for r in rows
    ]
    headers = ["policy", "KV budget", "accuracy", "KV KiB prefill", "KV KiB end", "host KiB",
               "rows attended/step", "attended share", "refreshes/token",
               "ms/token"]  # fmt: skip
    notes = (
        "KV KiB: resident on the device; host KiB: evicted rows kept for recall; "
        "attended share: rows attended per decode step over those a full cache attends; "
        "refreshes/token: share of decode steps that re-pick A-VL's core; "
        "ms/token: median over the examples' decode times"
    )
    return tabulate(table, headers=headers, stralign="right") + "\n" + notes


def write_csv(rows: Sequence[BenchRow], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.csv_row())
    return path


def plot_accuracy(rows: Sequence[BenchRow], path: str | Path, title: str = "") -> Path:
    """Accuracy against resident KV (the cache's bytes at the end of generate, as a share of
    the full cache's when it ran, else the budget), one line per policy (the full cache as a
    reference line); each policy its own marker and a small sideways offset, so lines that
    coincide stay visible."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    policies = [p for p in dict.fromkeys(r.policy for r in rows) if p != "full"]
    markers = "os^DvP*X"
    full_bytes = next((r.kv_bytes_end for r in rows if r.policy == "full"), None)

    def resident(row: BenchRow) -> float:
        return row.kv_bytes_end / full_bytes if full_bytes else row.kv_budget

    for policy in dict.fromkeys(r.policy for r in rows):
        points = sorted((resident(r), r.accuracy) for r in rows if r.policy == policy)
        if policy == "full":
            axes.axhline(points[0][1], color="black", linestyle="--", label="full cache")
            continue
        index = policies.index(policy)
        offset = 0.006 * (index - (len(policies) - 1) / 2)  # budgets are shares: 0.6% apart
        budgets, accuracies = zip(*points, strict=True)
        axes.plot(
            [b + offset for b in budgets], accuracies, marker=markers[index % len(markers)],
            markersize=5, alpha=0.85, label=policy,
        )  # fmt: skip
    if title:
        axes.set_title(title, fontsize=9)
    axes.set_xlabel(
        "resident KV (share of the full cache's bytes)" if full_bytes else "KV budget (share kept)"
    )
    axes.set_ylabel("exact-match accuracy")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
