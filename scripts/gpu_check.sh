#!/usr/bin/env bash
# The prepared device check (issue 16): one command on a CUDA machine with no network, using only
# what such a machine has (PyTorch, transformers, peft; no datasets, no pytest needed).
#   1. the CUDA checks: exact resume with the CUDA RNG, CUDA-graph decoding equal to eager
#   2. one PPO iteration benchmark on a random-init ~0.5B Llama-shaped model, built here:
#      fp32 vs bf16-mixed, eager vs CUDA-graph decoding; tokens/s per phase, peak memory, MFU
#   3. where vLLM is installed: rollout.engine: vllm, colocate, on the same ~0.5B model (at most
#      120 s): a weight sync, then vLLM's logprobs against the trainer's, and its tokens/s
# Finishes in under 8 minutes: the checks get at most 200 s, the benchmark what is left of 450 s
# (it starts no setting in its last 100 s, and prints each row when it is done). Output: stdout,
# and ${OUT:-/tmp}/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log="${OUT:-/tmp}/gpu_check.log"
py=${PYTHON:-$(command -v python3 || command -v python)}  # the image's python3 holds PyTorch
# --dry-run: the same steps on the CPU with the tiny model (checks the plumbing, measures nothing)
if [ "${1:-}" = --dry-run ]; then device=cpu size=tiny iters=1; else device=cuda size=0.5b iters=3; fi
header=$(DEVICE=$device "$py" - <<'PY'
import os, torch, transformers
on_cuda = os.environ["DEVICE"] == "cuda"
assert torch.cuda.is_available() or not on_cuda, "gpu_check: no CUDA device (--dry-run runs on the CPU)"
name = torch.cuda.get_device_name() if on_cuda else "CPU (dry run)"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {name}")
PY
) || exit 2
export PYTHONUNBUFFERED=1
start=$SECONDS
run_all() {
  local status=0
  echo "$header"
  if [ "$device" = cuda ] && "$py" -c "import pytest" 2>/dev/null; then
    timeout 200 "$py" -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu_ready.py || status=1
  else
    timeout 200 "$py" benchmarks/gpu_checks.py --device "$device" || status=1
  fi
  local left=$((450 - (SECONDS - start)))
  timeout "$left" "$py" benchmarks/gpu_ppo.py --device "$device" --size "$size" --iters "$iters" \
    --budget-s $((left - 100)) || status=1
  timeout 120 "$py" benchmarks/gpu_vllm.py --device "$device" --size "$size" || status=1
  echo "gpu_check: $((SECONDS - start)) s, status $status"
  return "$status"
}
run_all 2>&1 | grep -v '^\[step ' | tee "$log"
