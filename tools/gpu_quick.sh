#!/usr/bin/env bash
# One-call GPU check after the two staging parts (.gpuhost/p1, p2: python3.12 site + llama.cpp): parallel precompile,
# the GPU tests of the kernels and fusions not yet run on a GPU (grouped GEMM, routing, flash prefill, norm chains
# and their tails, the q8_1-writing attention and gate/up kernels, the dense GLU, the two-matrix GEMV) and the prefill / decode model tests, then the
# 30B-shape bench with llama.cpp in the same run. Every step has its own time limit so the call returns inside the
# device tool's 10 minutes; logs land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
. /tmp/gpuhost/env.sh
export SPARKINFER_CACHE_DIR=/tmp/sparkinfer_cache PYTHONUNBUFFERED=1
[ -e sparkinfer_cute/models ] || ln -s ../models sparkinfer_cute/models
[ -e sparkinfer_cute/autotune ] || ln -s ../autotune sparkinfer_cute/autotune
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
[ "${BENCH:-1}" = 1 ] && ( python3 -m sparkinfer_cute.gguf.synth --arch qwen3moe --preset 30b-a3b -o /tmp/qwen30b.gguf --seed 0 > "$OUT/synth.log" 2>&1 ) &
if [ "${PRECOMPILE:-1}" = 1 ]; then
  timeout "${T_PRE:-140}" python3 tools/precompile.py > "$OUT/precompile.log" 2>&1; tail -3 "$OUT/precompile.log"
fi
timeout "${T_TEST:-200}" python3 -m pytest -q -m gpu -n 14 -p no:cacheprovider tests/kernels/test_quant_gemm.py \
  tests/kernels/test_moe_route.py tests/kernels/test_elementwise.py tests/kernels/test_embedding_batch.py \
  tests/kernels/test_attention_prefill.py tests/kernels/test_norm_chain.py \
  "tests/kernels/test_moe_ffn.py::test_gate_up_writes_q8_1_copy" "tests/kernels/test_moe_ffn.py::test_dense_glu_as_one_expert" \
  "tests/kernels/test_attention_decode.py::test_quantized_output_equals_quantize_kernel" \
  "tests/kernels/test_attention_decode.py::test_prologue_bit_identical_to_qk_kernel_then_attention" \
  "tests/kernels/test_router.py::test_fused_router_expert_scale_is_the_gather_scale" \
  "tests/kernels/test_router.py::test_fused_router_prenorm" \
  "tests/kernels/test_gemv.py::test_gemv_second_matrix" \
  tests/models/test_gpu_prefill.py tests/models/test_gpu_decode.py > "$OUT/tests.log" 2>&1
tail -40 "$OUT/tests.log"
wait
[ "${BENCH:-1}" = 1 ] || exit 0
timeout "${T_BENCH:-170}" python3 -m sparkinfer_cute.bench /tmp/qwen30b.gguf --prompt-len 512 --gen 64 --runs 5 \
  --llama-bench /tmp/llama/llama-bench --llama-reps 2 --json "$OUT/bench30b.json" > "$OUT/bench30b.log" 2>&1
tail -16 "$OUT/bench30b.log"
