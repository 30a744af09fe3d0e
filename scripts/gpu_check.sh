#!/usr/bin/env bash
# The GPU checks, as one prepared run for a session lent a GPU machine (its python3 holds torch,
# transformers, accelerate, safetensors, pyyaml and pytest; nothing can be installed there, and
# none of these steps needs Hydra, datasets or the metric packages):
#   1. the `gpu`-marked tests of the attention hook and the maskers (CUDA vs CPU, bf16 runs);
#   2. decode steps of every method against SDPA in bf16 at 32k and 128k keys (issue 11);
#   3. a job's own path on a random-weight model of Llama-3.1-8B's shapes, 32 layers, against a
#      plain transformers loop (prefill, answer, decode ms/token, peak memory).
# Each step has its own time limit, so the whole run ends within 9.5 minutes (run it with a
# 600 s limit); logs go to
# $1 (default: $OUT, else /tmp/sa_bench-gpu). The Hydra sweep on GPUs (tests/test_gpu_sweep.py)
# needs hydra-core, omegaconf, hydra-joblib-launcher and datasets (carried as wheels, see the
# device notes): it runs last, only when they import.
#
#   scripts/gpu_check.sh [LOG_DIR]
#
# Smaller stand-ins for a try on a CPU: SA_BENCH_GPU_CHECK="cpu" uses the CPU, 2k keys and the
# tiny shape (the tests are then skipped, as without CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/sa_bench-gpu}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
py=${PYTHON:-python3}
if [ "${SA_BENCH_GPU_CHECK:-}" = cpu ]; then
  device=(--device cpu) keys=(2048) shape=(--shape tiny --layers 2) tokens=(1024)
else
  device=(--device cuda --dtype bfloat16) keys=(32768 131072) shape=(--shape llama3.1-8b --layers 32)
  tokens=(32768 131072)
fi
status=0
step() {  # name, seconds, command...: run it with a limit, its output to the console and a log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name: exit $rc"; status=1; }
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$py" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'; } 2>&1 | tee "$out/env.log"
step gpu_tests 110 "$py" -m pytest -q -rs -p no:cacheprovider -m gpu \
  tests/test_attention_gpu.py tests/test_attention_maskers.py
step perf_attention 120 "$py" -m sa_bench.perf.attention --keys "${keys[@]}" --steps 5 --per-kv-head \
  "${device[@]}"
step perf_scale 200 "$py" -m sa_bench.perf.scale "${shape[@]}" --tokens "${tokens[@]}" \
  --methods dense streaming oracle_topk quest "${device[@]}"
if "$py" -c "import hydra, omegaconf, datasets, hydra_plugins.hydra_joblib_launcher" 2>/dev/null; then
  step gpu_sweep 120 "$py" -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_gpu_sweep.py
else
  echo "== gpu_sweep: skipped (hydra, omegaconf, datasets or the joblib launcher missing)"
fi
exit $status
