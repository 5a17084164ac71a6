"""``avl-diff``: what the backend did to each graph of a model, and why.

For a model and a prompt it runs a short ``generate`` through a fresh ``avl`` backend and
reports, per captured graph: the attention sites rewritten (layer, policy and budgets), the
sites left dense with the reason, and a unified diff of the graph's Python code before and
after the passes. ``write`` puts the graphs and the diffs into files.

    avl-diff --model tiny-llava                          # a built-in tiny random model
    avl-diff --model tiny-llava --option policy=h2o --option kv_budget=0.3 --out graphs/
    avl-diff --model path/or/hf-id --image cat.png --prompt "What is in the picture?"

    report = avl_compile.diff.diff_model(model, inputs, {"vision_keep": 0.4})
    print(report.render())
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from avl_compile.backend import AvlBackend, CompiledGraphRecord
from avl_compile.console import hide_library_notices
from avl_compile.options import AvlOptions

TINY_MODELS = ("tiny-llava", "tiny-llava-next", "reader", "region-reader", "finder")


@dataclasses.dataclass
class SiteReport:
    name: str
    layer_idx: int | None
    rewritten: bool
    detail: str  # policy and budgets, or the reason it stayed dense


@dataclasses.dataclass
class GraphReport:
    index: int
    sites: list[SiteReport]
    image_mask_recorders: int
    code_before: str
    code_after: str
    modules: list[str] = dataclasses.field(default_factory=list)  # the model's parts it runs

    @property
    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self.code_before.splitlines(keepends=True),
                self.code_after.splitlines(keepends=True),
                fromfile=f"graph_{self.index}_before.py",
                tofile=f"graph_{self.index}_after.py",
            )
        )


@dataclasses.dataclass
class DiffReport:
    model: str
    options: AvlOptions
    graphs: list[GraphReport]

    def render(self, show_code: bool = True) -> str:
        lines = [f"avl-diff: {self.model}, {len(self.graphs)} graph(s) captured"]
        for graph in self.graphs:
            rewritten = sum(site.rewritten for site in graph.sites)
            runs = ", ".join(graph.modules) or "tensor code between modules (masks, positions)"
            if not graph.sites:
                lines.append(
                    f"\n== graph {graph.index}: no attention site; it runs {runs}"
                    + (" and merges the image features into the embeddings (image-mask "
                       "recorder)" if graph.image_mask_recorders else "")
                )  # fmt: skip
                continue
            lines.append(
                f"\n== graph {graph.index}: {rewritten} of {len(graph.sites)} attention site(s) "
                f"rewritten, {graph.image_mask_recorders} image-mask recorder(s); it runs {runs}"
            )
            for site in graph.sites:
                verdict = "rewritten" if site.rewritten else "dense    "
                lines.append(f"  {verdict} {site.name}: {site.detail}")
            if show_code and graph.diff:
                lines.append(graph.diff.rstrip("\n"))
        return "\n".join(lines)

    def write(self, folder: str | Path) -> Path:
        """graph_<i>_before.py, graph_<i>_after.py, graph_<i>.diff and report.txt."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for graph in self.graphs:
            (folder / f"graph_{graph.index}_before.py").write_text(graph.code_before)
            (folder / f"graph_{graph.index}_after.py").write_text(graph.code_after)
            (folder / f"graph_{graph.index}.diff").write_text(graph.diff)
        (folder / "report.txt").write_text(self.render(show_code=False) + "\n")
        return folder


def describe_policy(options: AvlOptions) -> str:
    """The policy and its budgets, as a site was rewritten with them."""
    if options.policy == "avl":
        text = (
            f"policy=avl S={options.vision_keep} C={options.vision_compute} "
            f"K={options.refresh_every} T={options.text_keep}"
        )
        if options.prefill_filter_keep is not None:
            text += f" P={options.prefill_filter_keep}@layer{options.prefill_filter_layer}"
        return text
    if options.policy == "full":
        return "policy=full"
    text = f"policy={options.policy} kv_budget={options.kv_budget}"
    if options.policy == "fastv":
        text += f" K={options.prefill_filter_layer}"
    return text


def _graph_report(record: CompiledGraphRecord) -> GraphReport:
    policy = describe_policy(record.options)
    sites = [
        SiteReport(
            name=site.name,
            layer_idx=site.layer_idx,
            rewritten=site.rewritable,
            detail=policy if site.rewritable else site.reason,
        )
        for site in record.sites
    ]
    return GraphReport(
        index=record.index,
        sites=sites,
        image_mask_recorders=record.recorders,
        code_before=record.code_before,
        code_after=record.code_after,
        modules=record.modules,
    )


def diff_model(
    model,
    inputs: Mapping[str, Any],
    options: Mapping[str, Any] | None = None,
    new_tokens: int = 3,
    name: str | None = None,
) -> DiffReport:
    """Compile ``model.forward`` with a fresh backend (inner compiler ``eager``: only the
    passes matter here), run ``generate`` for ``new_tokens`` and report every graph."""
    backend = AvlBackend({**dict(options or {}), "inner": "eager"})
    original_forward = model.forward
    model.forward = torch.compile(model.forward, backend=backend)
    try:
        model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    finally:
        model.forward = original_forward
    return DiffReport(
        model=name or type(model).__name__,
        options=backend.options,
        graphs=[_graph_report(record) for record in backend.graphs],
    )


def load_model_and_inputs(
    model: str, prompt: str | None, image: str | None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A built-in tiny model with its own prompt, or a Hugging Face checkpoint + a prompt."""
    if model in ("tiny-llava", "tiny-llava-next"):
        from avl_compile import tiny_models

        make = tiny_models.tiny_llava if model == "tiny-llava" else tiny_models.tiny_llava_next
        instance = make()
        return instance, tiny_models.llava_prompt(instance, [[1, 5, 6]], [[7, 8, 9]]).inputs
    from avl_compile.bench.evaluate import load_model, prompt_inputs
    from avl_compile.bench.reader_task import BUNDLED_MODELS, HELDOUT_SEED, make_examples

    if model in BUNDLED_MODELS:
        folder, task = BUNDLED_MODELS[model]
        model = str(folder)
        example = make_examples(1, HELDOUT_SEED, task)[0]
        record = {"image": example.image, "question": prompt or example.question}
    else:
        if image is None or prompt is None:
            raise SystemExit("avl-diff: a checkpoint needs --image and --prompt")
        from PIL import Image

        record = {"image": Image.open(image).convert("RGB"), "question": prompt}
    instance, processor = load_model(model, torch.float32, "cpu")
    return instance, prompt_inputs(processor, record, "cpu")


def _parse_option(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option takes name=value, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value  # a bare string such as policy=h2o


def main(argv: list[str] | None = None) -> int:
    hide_library_notices()
    parser = argparse.ArgumentParser(
        prog="avl-diff", description="Show what the avl backend rewrote in each graph, and why."
    )
    parser.add_argument(
        "--model",
        default="tiny-llava",
        help=f"one of {list(TINY_MODELS)}, or a Hugging Face id or folder",
    )
    parser.add_argument("--prompt", default=None, help="question text (checkpoints)")
    parser.add_argument("--image", default=None, help="image file (checkpoints)")
    parser.add_argument(
        "--option",
        action="append",
        type=_parse_option,
        default=[],
        metavar="NAME=VALUE",
        help="backend option, repeatable",
    )
    parser.add_argument("--new-tokens", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder to write the graphs and diffs to")
    parser.add_argument(
        "--no-code", dest="show_code", action="store_false", help="print the site summary only"
    )
    args = parser.parse_args(argv)  # fmt: skip
    options = dict(args.option)
    AvlOptions.from_mapping(options)  # bad options fail here, with the option named
    model, inputs = load_model_and_inputs(args.model, args.prompt, args.image)
    report = diff_model(model, inputs, options, args.new_tokens, name=args.model)
    print(report.render(show_code=args.show_code))
    if args.out:
        print(f"wrote {report.write(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
