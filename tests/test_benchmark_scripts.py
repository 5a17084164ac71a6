"""The benchmark scripts that BENCHMARKS.md quotes still run: each one's ``main`` on a tiny
preset (two layers, 16 image tokens), with the arguments its documented command uses.
Their numbers are measured by hand; these only catch a script that no longer runs, as
``decode_breakdown.py`` did from 090eed4 until session 35 (a changed helper's arguments)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = dict(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=128, image=56, patch=14,
            dtype="float32", new_tokens=4, prompt_text=12)  # fmt: skip


@pytest.fixture
def run_script(monkeypatch):
    """Run a benchmark script's ``main`` with ``arguments`` on the tiny preset; torch's
    thread count and Dynamo's recompile limit are restored after (the scripts set them for
    their process)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import end_to_end

    monkeypatch.setitem(end_to_end.PRESETS, "tiny", TINY)
    threads = torch.get_num_threads()

    def run(module: str, *arguments: str) -> None:
        script = __import__(module)
        monkeypatch.setattr(sys, "argv", [f"{module}.py", *arguments, "--preset", "tiny"])
        script.main()

    dynamo = torch._dynamo.config
    with dynamo.patch(recompile_limit=dynamo.recompile_limit):  # restored on exit
        yield run
    torch.set_num_threads(threads)


@pytest.mark.parametrize("recommended", [False, True], ids=["avl", "recommended"])
def test_decode_breakdown_runs(run_script, capsys, recommended):
    run_script("decode_breakdown", "--threads", "1", "--repeats", "1",
               *(["--recommended"] if recommended else []))  # fmt: skip
    out = capsys.readouterr().out
    steps = int(out.split("decode steps timed: ")[1].split()[0])
    assert steps == TINY["new_tokens"] - 1  # one dispatch per decode step of the timed generate
    assert "dispatcher's Python" in out


def test_first_token_runs(run_script, capsys):
    run_script("first_token", "--rounds", "1", "--configs", "dense", "avl", "recommended")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["dense", "avl", "recommended"]
    assert "vs dense 1.000" in lines[0]


def test_host_profile_runs(run_script, capsys):
    run_script("host_profile", "avl", "--generates", "1", "--top", "5")
    assert "function calls" in capsys.readouterr().out


def test_end_to_end_runs(run_script, capsys):
    configs = ("dense inductor", "avl (inductor)", "avl recommended (inductor)")
    run_script("end_to_end", "--threads", "1", "--repeats", "1", "--only", *configs)
    out = capsys.readouterr().out
    for config in configs:
        assert f"'config': '{config}'" in out
