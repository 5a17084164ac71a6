"""The bundled trained models in the layout vLLM 0.32 loads.

transformers 5.2x saves a LLaVA's CLIP tower as ``vision_tower.*``; vLLM 0.32's LLaVA loader
expects the 4.x names, ``vision_tower.vision_model.*``. A copy of the checkpoint with the
vision weights renamed (everything else as it is) is what vLLM is given.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

_TOWER = "vision_tower."
_TOWER_4X = "vision_tower.vision_model."


def vllm_model_dir(name_or_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """A folder vLLM can load for ``name_or_path`` (a bundled model's name, e.g. "reader",
    or a checkpoint folder): the checkpoint itself if its names are vLLM's already, else a
    copy in ``out_dir`` (default: a new temporary folder) with the vision weights renamed."""
    from safetensors.torch import load_file, save_file

    source = _checkpoint_folder(name_or_path)
    weights = sorted(source.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{source} holds no .safetensors weights")
    renamed = {}
    for path in weights:
        tensors = load_file(path)
        if any(k.startswith(_TOWER) and not k.startswith(_TOWER_4X) for k in tensors):
            renamed[path.name] = {_renamed(k): v for k, v in tensors.items()}
    if not renamed:
        return source
    target = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="avl-vllm-"))
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in renamed:
            shutil.copy2(path, target / path.name)
    for name, tensors in renamed.items():
        save_file(tensors, target / name, metadata={"format": "pt"})
    return target


def _renamed(key: str) -> str:
    if key.startswith(_TOWER) and not key.startswith(_TOWER_4X):
        return _TOWER_4X + key[len(_TOWER) :]
    return key


def _checkpoint_folder(name_or_path: str | Path) -> Path:
    from avl_compile.bench.cli import bundled_model
    from avl_compile.bench.reader_task import BUNDLED_MODELS

    folder = Path(bundled_model(str(name_or_path))[0])
    if not folder.is_dir():
        known = ", ".join(BUNDLED_MODELS)
        raise ValueError(
            f"model must be a bundled model ({known}) or a folder, got {name_or_path!r}"
        )
    return folder


def task_requests(model: str, n: int, seed: int | None = None) -> tuple[list[dict], list[str]]:
    """``n`` held-out examples of a bundled model's task (default seed: the held-out
    split's) as vLLM prompts (``{"prompt": ..., "multi_modal_data": {"image": ...}}``, the
    processor's chat template), and their answers."""
    from transformers import AutoProcessor

    from avl_compile.bench import reader_task

    folder, task = reader_task.BUNDLED_MODELS[model]
    processor = AutoProcessor.from_pretrained(folder)
    seed = reader_task.HELDOUT_SEED if seed is None else seed
    examples = reader_task.make_examples(n, seed, task)
    requests = []
    for example in examples:
        content = [{"type": "image"}, {"type": "text", "text": example.question}]
        messages = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        requests.append({"prompt": prompt, "multi_modal_data": {"image": example.image}})
    return requests, [example.answer for example in examples]
