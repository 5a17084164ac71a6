"""passes/ and lowering/ ship inside the package, in a wheel as in an editable install."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy: setuptools builds in the source's own build/, and test workers that build
    # the checkout at once (this fixture is per worker) remove each other's files there
    source = tmp_path_factory.mktemp("source") / "avl-compile"
    skipped = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                     "__pycache__", "*_cache", "bench_results", "out",
                                     ".gpu_deps", "gpu_results")  # fmt: skip
    shutil.copytree(ROOT, source, ignore=skipped)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True,
    )
    return next(out.glob("avl_compile-*.whl"))


def test_wheel_maps_the_folders_into_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "avl_compile/passes/find_attention_sites.py" in names
    assert "avl_compile/lowering/gathered_attention.py" in names
    assert "avl_compile/lowering/recall_swap.c" in names  # built at first use
    assert "avl_compile/lowering/core_choice.c" in names
    assert not any(n.startswith(("passes/", "lowering/")) for n in names)
    # the bench and its bundled trained models ship with the package
    assert "avl_compile/bench/cli.py" in names
    for model in ("reader", "region_reader", "finder"):
        for file in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
            assert f"avl_compile/models/{model}/{file}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[torch_dynamo_backends]" in text and "avl = avl_compile:avl_backend" in text
    assert "avl-bench = avl_compile.bench.cli:main" in text


def test_installed_wheel_imports_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    # recall's C swap builds from the installed copy of its source
    code = (
        "import avl_compile.passes.rewrite_attention_sites, avl_compile.lowering\n"
        "from avl_compile.lowering.native_recall_swap import library\n"
        "print('ok', library() is not None)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={
            "PYTHONPATH": str(target),
            "AVL_CACHE_DIR": str(tmp_path / "cache"),
            "PATH": os.environ.get("PATH", os.defpath),
        },
        capture_output=True,
        text=True,
    )
    assert result.stdout.strip() == "ok True", result.stderr
    assert list((tmp_path / "cache").glob("torch_kernels_*.so"))


def test_backend_name_resolves_without_importing_the_package():
    code = (
        "import sys, torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "backend = lookup_backend('avl')\n"
        "print(backend.__module__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "avl_compile", result.stderr
