"""The ``avl_compile`` logger: a summary per compiled graph at INFO, silent by default."""

import logging
import subprocess
import sys

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


def test_nothing_is_printed_by_default():
    script = (
        "import avl_compile, torch\n"
        "from avl_compile.tiny_models import llava_prompt, tiny_llava\n"
        "m = avl_compile.compile(tiny_llava(), options={'inner': 'eager'})\n"
        "p = llava_prompt(m, [[1, 5, 6]], [[7, 8, 9]])\n"
        "m.generate(**p.inputs, max_new_tokens=3, do_sample=False)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, check=True
    )
    assert "avl" not in done.stderr and "avl" not in done.stdout
