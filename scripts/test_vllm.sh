#!/usr/bin/env bash
# The vLLM engine's tests (tests/test_vllm.py), in .venv-vllm (built by scripts/setup_vllm.sh on
# first use), on their own. `bash scripts/test.sh` runs them too, from tests/test_vllm_venv.py
# (docs/vllm.md, "In CI").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
exec .venv-vllm/bin/python -m pytest tests/test_vllm.py tests/test_engines.py -n 0 "$@"
