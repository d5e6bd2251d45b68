#!/usr/bin/env bash
# The numerics tests and the benchmarks on one GPU, each stage time-boxed so that one stage's
# failure or hang leaves the others' results:
#
#     bash bench/on_gpu.sh [RESULTS_DIR]      # default: bench/results/gpu
#
# The stages' limits add up to 540 s (a stage that outlives its limit gets 10 s more to stop).
# Writes RESULTS_DIR/log.txt (every stage's output, the GPU and the package versions first) and
# one JSON per benchmark; exits 1 if any stage failed, and 2 at once if JAX sees no GPU. qed_jax
# must be importable (`pip install -e .`, or the repository root on PYTHONPATH) beside CUDA
# builds of jax and torch, with pytest-xdist installed. Stages, most telling first:
# - the SFT step and sampling at Qwen3-0.6B's shape in bfloat16, against PyTorch / transformers on
#   the same GPU;
# - the parity tests (transformers' logits and greedy generate, attention implementations, chunked
#   log-probs, remat) with JAX on the GPU, float32 at the highest matmul precision (tests/conftest.py);
# - both benchmarks at the default ~48M model in float32 (the CPU benchmarks' shape).
set -u -o pipefail
results=${1:+$(realpath -m "$1")}  # as given, from where the script was called
cd "$(dirname "$0")/.."
backend=$(timeout 60 python3 -c 'import jax; print(jax.default_backend())' 2>/dev/null | tail -n 1)
if [[ $backend != gpu ]]; then
  echo "bench/on_gpu.sh: JAX sees no GPU here (default backend: ${backend:-none, JAX did not start}); on a CPU run the benchmarks themselves (bench/README.md)" >&2
  exit 2
fi

results=${results:-bench/results/gpu}
mkdir -p "$results"
log="$results/log.txt"
: >"$log"
export PYTHONUNBUFFERED=1
failed=()

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (at most ${limit} s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  echo "== $name: rc=$rc after $((SECONDS - start)) s" | tee -a "$log"
  ((rc == 0)) || failed+=("$name")
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 60 python3 -c 'import jax, flax, optax, orbax.checkpoint as o, transformers, torch
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__,
      "transformers", transformers.__version__, "torch", torch.__version__, jax.devices())'; } 2>&1 | tee -a "$log"

stage train_step_qwen3-0.6b 110 python3 bench/train_step.py --preset qwen3-0.6b --dtype bfloat16 --batch 4 --seq 2048 \
  --out "$results/train_step_qwen3-0.6b_bf16.json"
stage sampling_qwen3-0.6b 140 python3 bench/sampling.py --preset qwen3-0.6b --dtype bfloat16 \
  --out "$results/sampling_qwen3-0.6b_bf16.json"
parity="logits_match_transformers or segment_ids_keep or kv_cache_decode_matches or greedy_matches or greedy_reading"
parity+=" or waves_greedy or implementation_matches_xla or model_logits_match_xla or prefill_equals_decode"
parity+=" or remat_gives or values_equal_full or gradients_equal_full or weighted_nll_sum_value"
# Four test processes compile side by side (compiling, not the GPU, is what these tiny tests wait
# on), each taking GPU memory as it needs it.
stage parity_tests 160 env JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -q -rfE \
  -p no:cacheprovider -n 4 -k "($parity) and not splash" \
  tests/test_model_hf.py tests/test_sampling.py tests/test_attention.py tests/test_losses.py tests/test_sft.py
stage train_step_default 60 python3 bench/train_step.py --out "$results/train_step_default_fp32.json"
stage sampling_default 70 python3 bench/sampling.py --out "$results/sampling_default_fp32.json"

if ((${#failed[@]})); then
  echo "failed: ${failed[*]} (see $log)" | tee -a "$log"
  exit 1
fi
