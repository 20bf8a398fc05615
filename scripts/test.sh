#!/usr/bin/env bash
# The README's test command: set up the virtualenv, lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
# tcmalloc preloaded where installed, as the `rlhfkit` command does (rlhfkit/launch.py); the
# slowest tests are listed so that the next slow one shows itself; pyproject's addopts run the
# suite on one pytest-xdist worker per core
if [ "$#" -eq 0 ]; then ALL=1; fi
if [ "${ALL:-}" = 1 ] && [ "$(uname -m)" = x86_64 ]; then
  # vLLM's virtualenv (scripts/setup_vllm.sh, ~1 min) is built while the suite starts;
  # tests/test_vllm_venv.py waits for its exit status, then runs tests/test_vllm.py in it
  mkdir -p .cache && rm -f .cache/setup_vllm.rc
  ( set +e; bash scripts/setup_vllm.sh > .cache/setup_vllm.log 2>&1; echo $? > .cache/setup_vllm.rc ) &
  export RLHFKIT_VLLM_SETUP="$PWD/.cache/setup_vllm.rc"
fi
.venv/bin/python -m rlhfkit.launch .venv/bin/python -m pytest -q --durations=25 "$@"
if [ "${ALL:-}" = 1 ] && ! grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  # an AVX2-only CPU: the first pass ran at AVX2 already, which is all the cap would give
  echo "== cpu_isa tests: this CPU has no AVX-512, so the run above was the AVX2 run =="
elif [ "${ALL:-}" = 1 ]; then
  # The whole-suite run again for the tests whose kernels differ by CPU (marker cpu_isa), with
  # AVX-512 and its bf16 instructions out of reach: oneDNN capped at AVX2 and ATen's kernels at
  # AVX2, as on the AVX2-only machines CI also lands on (issue 21). Inductor gets its own cache:
  # kernels it compiled for AVX-512 are not valid under the cap.
  echo "== cpu_isa tests with the ISA capped at AVX2 =="
  ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor-avx2" \
    .venv/bin/python -m rlhfkit.launch .venv/bin/python -m pytest -q -m cpu_isa -p no:cacheprovider
fi
