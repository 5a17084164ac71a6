"""The project's own commands print their results and nothing of the libraries underneath
(Dynamo's 30-line note on the graph break at transformers' image check, deprecations)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *command], cwd=ROOT, capture_output=True, text=True, check=True
    )


def test_quickstart_leads_with_what_the_backend_did_and_prints_nothing_else():
    done = _run("examples/quickstart.py", "--inner", "eager", "--new-tokens", "5")
    lines = done.stdout.splitlines()
    assert lines[0].startswith("avl on a tiny random LLaVA")
    assert "4 of 4 steps ran inside the compiled graph" in done.stdout
    assert sum("KV rows kept" in line for line in lines) == 3  # one line per layer
    assert "random" in next(line for line in lines if line.startswith("answers:"))
    assert done.stderr == "", done.stderr


def test_avl_diff_prints_no_library_notices():
    done = _run("-m", "avl_compile.diff", "--model", "tiny-llava", "--no-code")
    assert done.stdout.startswith("avl-diff: ")
    assert "Graph break" not in done.stderr and "deprecated" not in done.stderr, done.stderr
