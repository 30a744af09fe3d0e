#!/usr/bin/env bash
# The GPU checks, as one prepared run for a session lent a GPU machine (its python3 holds torch,
# transformers, accelerate, safetensors, pyyaml and pytest; nothing can be installed there, and
# none of these steps needs Hydra, datasets or the metric packages):
#   0. the environment: GPU, torch / CUDA / cuDNN versions, and the SDPA kernel that decode and
#      a masked prefill chunk actually run in bf16 (profiler kernel names);
#   1. the `gpu`-marked tests of the attention hook and the maskers (CUDA vs CPU, bf16 runs);
#   2. decode steps of every method against SDPA in bf16 at 32k and 128k keys (issue 11), with
#      each method's kernel launches and host syncs per decode layer (issue 21 item 9);
#   3. a job's own path on a random-weight model of Llama-3.1-8B's shapes, 32 layers, built in
#      bf16 on the GPU, against a plain transformers loop (prefill, answer, decode ms/token,
#      peak memory per method), 32k and then 128k as its own step (each run's row is printed
#      when it ends, so a timeout keeps the rows before it).
# cuDNN's SDPA is deprioritised (TORCH_CUDNN_SDPA_DEPRIORITIZED=1): it builds a plan for every
# new (rows, keys) shape, i.e. every decode token.
# Each step has its own time limit, so the whole run ends within 9.5 minutes (run it with a
# 600 s limit); logs go to
# $1 (default: $OUT, else /tmp/sa_bench-gpu). The Hydra sweep on GPUs (tests/e2e/test_gpu_sweep.py)
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
export TORCH_CUDNN_SDPA_DEPRIORITIZED=1
py=${PYTHON:-python3}
if [ "${SA_BENCH_GPU_CHECK:-}" = cpu ]; then
  device=(--device cpu) keys=(2048) shape=(--shape tiny --layers 2) tokens=(1024) long=(2048)
  sdpa_device=cpu sdpa_keys=2048
else
  device=(--device cuda --dtype bfloat16) keys=(32768 131072) shape=(--shape llama3.1-8b --layers 32)
  tokens=(32768) long=(131072) sdpa_device=cuda sdpa_keys=131072
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
"cuda", torch.cuda.is_available(), "transformers", transformers.__version__,
"cudnn", torch.backends.cudnn.version())'; } 2>&1 | tee "$out/env.log"
step sdpa_backend 60 "$py" - "$sdpa_device" "$sdpa_keys" <<'PY'
# Which SDPA kernel runs, as the profiler names it: decode (query heads of a kv head as rows)
# and a masked prefill chunk (folded GQA rows, boolean mask), bf16 on the GPU
import sys, torch
from torch.profiler import ProfilerActivity, profile
from sa_bench.attention.dense import dense_attention
device, kv = sys.argv[1], int(sys.argv[2])
dtype = torch.bfloat16 if device == "cuda" else torch.float32
module = type("M", (), {"training": False, "layer_idx": 0, "num_key_value_groups": 4})()
k = torch.randn(1, 8, kv, 128, device=device, dtype=dtype)
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
for name, q, mask in (("decode", 1, None), ("masked chunk", 256, True)):
    query = torch.randn(1, 32, q, 128, device=device, dtype=dtype)
    m = None if mask is None else torch.ones(q, kv, dtype=torch.bool, device=device).tril(kv - q).expand(1, 1, q, kv)
    with profile(activities=acts) as prof:
        dense_attention(module, query, k, k, m, 128**-0.5, "sdpa")
    names = sorted({e.name for e in prof.events() if any(s in e.name.lower() for s in
                    ("flash", "efficient", "cudnn", "math", "scaled_dot"))})
    print(f"sdpa {name} ({q} rows x {kv} keys, {dtype}): {names}")
print("peak MiB", torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else "-")
PY
step gpu_tests 90 "$py" -m pytest -q -rs -p no:cacheprovider -m gpu \
  tests/unit/attention/test_attention_gpu.py tests/unit/attention/test_attention_maskers.py
step perf_attention 100 "$py" -m sa_bench.perf.attention --keys "${keys[@]}" --steps 5 --per-kv-head \
  "${device[@]}"
step perf_scale 150 "$py" -m sa_bench.perf.scale "${shape[@]}" --tokens "${tokens[@]}" \
  --methods dense streaming oracle_topk quest "${device[@]}"
step perf_scale_128k 150 "$py" -m sa_bench.perf.scale "${shape[@]}" --tokens "${long[@]}" \
  --methods dense streaming oracle_topk quest "${device[@]}"
if "$py" -c "import hydra, omegaconf, datasets, hydra_plugins.hydra_joblib_launcher" 2>/dev/null; then
  step gpu_sweep 120 "$py" -m pytest -q -rs -p no:cacheprovider -m gpu tests/e2e/test_gpu_sweep.py
else
  echo "== gpu_sweep: skipped (hydra, omegaconf, datasets or the joblib launcher missing)"
fi
exit $status
