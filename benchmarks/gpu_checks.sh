#!/usr/bin/env bash
# The checks that need a GPU, for a session that is lent one (the device tool runs one
# command of at most 10 minutes at a time, so each part is its own call):
#   bash benchmarks/gpu_checks.sh tests      # GPU-only tests: bf16 kernel, Triton in Inductor,
#                                            # CUDA-graph decode; HF's compile path and the
#                                            # in-graph decode on the image's transformers
#   bash benchmarks/gpu_checks.sh attention  # benchmarks/attention.py default grid (bf16, batch 1/16)
#   bash benchmarks/gpu_checks.sh e2e        # benchmarks/end_to_end.py --preset llava16, batch 1/16
#                                            # (dense and avl, with and without CUDA graphs)
#   bash benchmarks/gpu_checks.sh vllm       # benchmarks/vllm_serving.py --quick where vLLM is
#                                            # installed (the A-VL plugin is CPU-engine only)
#   bash benchmarks/gpu_checks.sh lease      # all of it sized for one 10-minute call (a lease is
#                                            # 15 minutes): GPU-only tests, then dense eager, avl
#                                            # and dense Inductor + CUDA graphs at batch 1, and
#                                            # dense eager and avl at batch 16
# Output goes to $OUT (the device tool brings it back) or gpu_results/. The device image has
# torch, transformers and triton but nothing can be downloaded there: carry a folder made here
# with `pip install --target .gpu_deps tabulate` (git-ignored; name it in carry) if tabulate is
# missing; it is put on the path.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
# the package maps passes/ and lowering/ into avl_compile: install it (offline, no deps)
python -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv >"$out/device.txt" || true
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" >>"$out/device.txt"
case "${1:?tests, attention or e2e}" in
  tests)
    python -m pytest -q -n 0 tests/test_triton_gathered_attention.py tests/test_gathered_attention.py \
      tests/test_avl_policy.py tests/test_hf_compile_path.py \
      tests/test_decode_in_graph.py \
      "tests/test_beyond_avl.py::test_recall_on_a_gpu_matches_the_reference" 2>&1 \
      | tee "$out/tests.txt" ;;
  attention)
    python benchmarks/attention.py 2>&1 | tee "$out/attention.txt" ;;
  e2e)
    python benchmarks/end_to_end.py --preset llava16 --batch 1 16 --repeats 3 2>&1 \
      | grep -v '^W[0-9]' | tee "$out/end_to_end.txt" ;;
  lease)
    export PYTHONUNBUFFERED=1
    timeout 90 python -m pytest -q -n 0 tests/test_triton_gathered_attention.py \
      "tests/test_decode_in_graph.py::test_cuda_graph_decode_generates_what_the_plain_graph_does" \
      "tests/test_beyond_avl.py::test_recall_on_a_gpu_matches_the_reference" \
      2>&1 | tee "$out/tests.txt" || true
    # avl compiles about 3x as long as dense Inductor at 32 layers (CPU: 259 s vs 86 s for
    # the first generate of --preset cpu-host): batch 1 first, batch 16 with what time is left
    timeout 360 python benchmarks/end_to_end.py --preset llava16 --batch 1 --repeats 2 \
      --only "dense eager" "avl (inductor)" "dense inductor (cudagraphs)" 2>&1 \
      | grep -v '^W[0-9]' | tee "$out/end_to_end_b1.txt" || true
    timeout 120 python benchmarks/end_to_end.py --preset llava16 --batch 16 --repeats 2 \
      --only "dense eager" "avl (inductor)" 2>&1 \
      | grep -v '^W[0-9]' | tee "$out/end_to_end_b16.txt" || true ;;
  vllm)
    # vLLM dense vs vLLM + A-VL; the A-VL rows need vLLM's CPU engine (the plugin refuses
    # another platform with NotImplementedError), so on a GPU this measures dense only
    if python -c "import vllm" 2>/dev/null; then
      python benchmarks/vllm_serving.py --quick 2>&1 | tee "$out/vllm_serving.txt"
    else
      echo "vLLM is not installed in this image: skipped" | tee "$out/vllm_serving.txt"
    fi ;;
  *) echo "unknown part $1" >&2; exit 2 ;;
esac
