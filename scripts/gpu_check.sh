#!/usr/bin/env bash
# The prepared device check (issue 16): one command on a CUDA machine with no network, using only
# what such a machine has (PyTorch, transformers, peft; no datasets, no pytest needed).
#   1. the CUDA checks: exact resume with the CUDA RNG, CUDA-graph decoding equal to eager
#   2. one PPO iteration benchmark on a random-init ~0.5B Llama-shaped model, built here:
#      fp32 vs bf16, eager vs CUDA-graph decoding; tokens/s per phase, peak memory, MFU
# Meant to finish in under 8 minutes; each part has its own time limit. Output: stdout, and
# ${OUT:-/tmp}/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log="${OUT:-/tmp}/gpu_check.log"
python - <<'PY' || exit 2
import torch, transformers
assert torch.cuda.is_available(), "gpu_check: no CUDA device"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
PY
status=0
{
  if python -c "import pytest" 2>/dev/null; then
    timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_ready.py || status=1
  else
    timeout 240 python benchmarks/gpu_checks.py || status=1
  fi
  timeout 360 python benchmarks/gpu_ppo.py --size 0.5b --iters 3 || status=1
} 2>&1 | tee "$log"
exit "$status"
