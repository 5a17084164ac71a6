"""The ``avl_compile`` logger: a summary per compiled graph at INFO, silent by default."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import transformers
from helpers import compiled_greedy

from avl_compile.tiny_models import llava_prompt, tiny_llava


def test_info_summarises_what_each_compile_rewrote(caplog):
    prompt = llava_prompt(tiny_llava(), [[1, 5, 6]], [[7, 8, 9]])
    with caplog.at_level(logging.INFO, logger="avl_compile"):
        compiled_greedy(tiny_llava, prompt.inputs, {"policy": "h2o", "inner": "eager"}, 4)
    summaries = [r.getMessage() for r in caplog.records if "attention sites" in r.getMessage()]
    assert summaries, "no per-graph summary was logged"
    assert any("rewrote 3 of 3 attention sites (policy=h2o), 1 image-mask" in s for s in summaries)


def test_info_says_when_the_decode_step_runs_inside_the_graph(caplog):
    prompt = llava_prompt(tiny_llava(), [[1, 5, 6]], [[7, 8, 9]])
    with caplog.at_level(logging.INFO, logger="avl_compile"):
        compiled_greedy(tiny_llava, prompt.inputs, {"inner": "eager"}, 4)
    summaries = [r.getMessage() for r in caplog.records if "attention sites" in r.getMessage()]
    assert any("(policy=avl, decode step inside the graph)" in s for s in summaries)


# what the project prints: its logger's records ("avl: ...") and its warnings
# ("UserWarning: avl: ..."); never a bare "avl", which file paths may hold
_OURS = re.compile(r"(^|Warning: )avl( backend)?: ", re.MULTILINE)


def test_nothing_is_printed_by_default(tmp_path):
    """A user's generate with an image prints nothing of ours, even where every path holds
    "avl": the script, and transformers imported from a folder named like the project (as
    with a clone or a virtual environment in `avl-compile/`)."""
    folder = tmp_path / "avl-compile"
    folder.mkdir()
    site_packages = Path(transformers.__file__).parent.parent
    (folder / "site-packages").symlink_to(site_packages)
    script = folder / "run.py"
    script.write_text(
        "import avl_compile, transformers\n"
        "from avl_compile.tiny_models import llava_prompt, tiny_llava\n"
        "assert 'avl-compile' in transformers.__file__\n"
        "m = avl_compile.compile(tiny_llava(), options={'inner': 'eager'})\n"
        "p = llava_prompt(m, [[1, 5, 6]], [[7, 8, 9]])\n"
        "m.generate(**p.inputs, max_new_tokens=3, do_sample=False)\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(folder / "site-packages")}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=folder, env=environment, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    assert not _OURS.search(done.stderr) and not _OURS.search(done.stdout), done.stderr
    if "Graph break" in done.stderr:  # Dynamo's own warning prints paths: they hold "avl"
        assert "avl-compile" in done.stderr


def test_the_pattern_finds_our_messages_and_not_paths():
    assert _OURS.search("x.py:3: UserWarning: avl: this prompt runs dense attention")
    assert _OURS.search("avl backend: option vision_keep=2 is invalid")
    assert not _OURS.search('File "/home/me/avl-compile/.venv/lib/transformers/x.py", line 3')
    assert not _OURS.search("/src/avl_compile/runtime.py:68: in run_site")
