#!/usr/bin/env bash
# The vLLM engine's tests (tests/test_vllm.py), in .venv-vllm (built by scripts/setup_vllm.sh on
# first use). Not part of `bash scripts/test.sh`: the set-up alone (~2.5 min, 3.5 GB) does not fit
# the suite's 15-minute budget on the 2-core AVX2 machine (docs/vllm.md, "In CI").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
exec .venv-vllm/bin/python -m pytest tests/test_vllm.py tests/test_engines.py -n 0 "$@"
